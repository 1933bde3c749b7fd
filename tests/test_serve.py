"""The OpenAI-compatible server (``eagle3-jax serve``), live on 127.0.0.1, called with the official ``openai`` client.

One server process (the embedded demo pair, speculative, 8 batch rows, 256
KV slots per request, a queue of 64) serves every test of this module. The
tokens it returns are checked against :meth:`Generator.generate` of each
prompt alone in this process: batching, admission between chunks and other
requests' sampling settings must change no token.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from eagle3_jax.serve.protocol import APIError, Defaults, parse_request
from eagle3_jax.serve.text_stream import ReasoningSplitter, TextStream
from eagle3_jax.text import reasoning_and_answer

CACHE, BATCH, QUEUE = 256, 8, 64
REF_WIDTH = 48  # every reference runs with this token limit, then is cut: one compiled program per prompt bucket
# A ChatML template; with enable_thinking the generation prompt opens <think>, as Qwen3-Thinking-2507's does.
# An operator's template that runs for ever when a client asks (``spin``): the --prepare-timeout must stop it.
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
            "{% if enable_thinking %}{{ '<think>\\n' }}{% endif %}{% endif %}"
            "{% if spin %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}")
# The server's limits, small enough to reach cheaply.
LIMITS = {"--max-body-bytes": 1_000_000, "--max-prompt-chars": 20_000, "--max-messages": 64, "--max-stop-strings": 4,
          "--max-json-depth": 16, "--prepare-timeout": 2, "--header-timeout": 2, "--body-timeout": 2}


_server: dict | None = None


def start_server() -> dict:
    """Starts the server process (once); conftest.py calls this as soon as the tests are collected, so that
    its start-up (loading, compiling) runs beside the tests before this module's."""
    global _server
    if _server is None:
        from eagle3_jax.demo import demo_paths

        target, head = demo_paths("toy")
        work = tempfile.mkdtemp(prefix="eagle3-jax-serve-test-")
        template = os.path.join(work, "chatml.jinja")
        with open(template, "w") as f:
            f.write(TEMPLATE)
        log = open(os.path.join(work, "server.log"), "w+")
        proc = subprocess.Popen(
            [sys.executable, "-m", "eagle3_jax", "serve", "--target", target, "--draft", head, "--port", "0",
             "--json", "--max-batch", str(BATCH), "--max-cache-len", str(CACHE), "--max-queue", str(QUEUE),
             "--chat-template", template, "--reasoning-parser", "qwen3", "--served-model-name", "demo",
             "--warmup-buckets", "16,32,64", *[str(x) for item in LIMITS.items() for x in item]],
            stdout=subprocess.PIPE, stderr=log, text=True)
        _server = {"proc": proc, "log": log, "work": work, "target": target, "head": head}
    return _server


def stop_server() -> None:
    global _server
    if _server is None:
        return
    proc = _server["proc"]
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    _server["log"].close()
    shutil.rmtree(_server["work"], ignore_errors=True)
    _server = None


@pytest.fixture(scope="module")
def server():
    info = start_server()
    try:
        if "url" not in info:
            ready, _, _ = select.select([info["proc"].stdout], [], [], 300)
            line = info["proc"].stdout.readline() if ready else ""
            if not line:
                info["proc"].kill()
                info["log"].seek(0)
                pytest.fail(f"the server did not start:\n{info['log'].read()[-3000:]}")
            info.update(json.loads(line))
        yield info
    finally:
        stop_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def generator(server):
    """A Generator of the server's pair and cache size, in this process."""
    from eagle3_jax import Generator, load_draft, load_target

    target = load_target(server["target"])
    return Generator(target, load_draft(server["head"], target.config), max_cache_len=CACHE)


@pytest.fixture(scope="module")
def reference(generator):
    """Generator.generate of one prompt alone, with the server's cache size (no batching).

    It runs with ``max_new_tokens=REF_WIDTH`` and is cut to ``max_tokens``: a smaller limit only
    ends the same tokens sooner (it is no compiled shape of the server's), and one width keeps
    this to one program per prompt bucket.
    """
    from eagle3_jax import SamplingParams

    def generate(prompt, max_tokens, temperature=0.0, top_p=1.0, seed=0):
        assert max_tokens <= REF_WIDTH
        [out] = generator.generate([prompt], max_new_tokens=REF_WIDTH, seed=seed,
                                   sampling=SamplingParams(temperature=temperature, top_p=top_p))
        ids = out.token_ids[:max_tokens]
        text = ids[:-1] if ids[-1] in generator.config.eos_token_ids else ids  # a final eos is not text
        return ids, generator.tokenizers.get().decode(text, skip_special_tokens=True)

    return generate


def _metrics(server) -> str:
    return httpx.get(server["url"] + "/metrics").text


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_completions_and_chat_whole_and_streamed(server, client, reference):
    [model] = client.models.list().data
    assert model.id == "demo" and server["speculative"] is True

    prompt = "def fibonacci(n):"
    whole = client.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0,
                                      extra_body={"return_token_ids": True})
    choice = whole.choices[0]
    assert whole.object == "text_completion" and choice.finish_reason in ("length", "stop")
    ids = choice.model_extra["token_ids"]
    prompt_ids = choice.model_extra["prompt_token_ids"]
    ref_ids, ref_text = reference(prompt_ids, 24)
    assert ids == ref_ids and choice.text == ref_text
    assert whole.usage.prompt_tokens == len(prompt_ids) and whole.usage.completion_tokens == len(ids)

    streamed = list(client.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert [c.choices[0].finish_reason for c in streamed].count(None) == len(streamed) - 1
    assert streamed[-1].usage.completion_tokens == len(ids)

    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    chat = client.chat.completions.create(model="demo", messages=messages, max_tokens=20, temperature=0)
    msg = chat.choices[0].message
    assert chat.object == "chat.completion" and msg.role == "assistant" and msg.content
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == msg.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    # A template that opens <think> (Qwen3-Thinking-2507's): the reply is reasoning until </think>.
    thinking = client.chat.completions.create(model="demo", messages=messages, max_tokens=20, temperature=0,
                                              extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    reply = thinking.choices[0].message
    assert reply.model_extra["reasoning_content"] and reply.content == ""

    # Stop strings cut the text (the stop string itself left out) and end the request with 'stop'.
    cut = choice.text[5:9]
    stopped = client.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0, stop=[cut])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == choice.text.split(cut)[0]


def test_64_concurrent_streams_each_complete_once_with_the_tokens_of_generate_alone(server, reference):
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(64):
        prompt = [int(t) for t in rng.integers(1, 4000, size=int(rng.integers(3, 40)))]
        sampled = i % 4 == 3  # a sampled request with its own seed every fourth row: per-row settings
        jobs.append(dict(prompt=prompt, max_tokens=int(rng.integers(4, 48)), temperature=0.7 if sampled else 0.0,
                         top_p=0.9 if sampled else 1.0, seed=1000 + i))

    async def one(client, job):
        stream = await client.completions.create(
            model="demo", prompt=job["prompt"], max_tokens=job["max_tokens"], temperature=job["temperature"],
            top_p=job["top_p"], seed=job["seed"], stream=True, extra_body={"return_token_ids": True})
        ids, finishes = [], []
        async for c in stream:
            ids += c.choices[0].model_extra.get("token_ids") or []
            if c.choices[0].finish_reason is not None:
                finishes.append(c.choices[0].finish_reason)
        return ids, finishes

    async def main():
        client = openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)
        return await asyncio.gather(*(one(client, job) for job in jobs))

    before = _metric(_metrics(server), "eagle3_acceptance_length_count")
    results = asyncio.run(main())
    for job, (ids, finishes) in zip(jobs, results):
        assert len(finishes) == 1, finishes
        assert ids == reference(job["prompt"], job["max_tokens"], job["temperature"], job["top_p"], job["seed"])[0]
    metrics = _metrics(server)
    assert _metric(metrics, "eagle3_acceptance_length_count") > before
    assert _metric(metrics, "eagle3_running_requests") == 0 and _metric(metrics, "eagle3_queue_depth") == 0


BAD = [
    (b"{not json", "not valid JSON", None),
    ({"model": "gpt-4", "prompt": "x"}, "does not exist", "model"),
    ({"model": "demo", "prompt": "x", "max_tokens": 0}, "at least 1", "max_tokens"),
    ({"model": "demo", "prompt": "x", "max_tokens": "5"}, "must be an integer", "max_tokens"),
    ({"model": "demo", "prompt": "x", "temperature": "hot"}, "must be a number", "temperature"),
    ({"model": "demo", "prompt": 12}, "string or a list of token ids", "prompt"),
    ({"model": "demo", "prompt": list(range(1, CACHE + 10))}, "at most 255", "prompt"),
    ({"model": "demo", "prompt": [1, 2, 3], "max_tokens": CACHE}, "at most 253 tokens", "max_tokens"),
    ({"model": "demo", "prompt": "x", "n": 2}, "not supported", "n"),
    ({"model": "demo", "prompt": "x", "top_k": 10**12}, "at most", "top_k"),
    ({"model": "demo", "prompt": [1, 99999]}, "outside the vocabulary", None),
    ({"model": "demo", "messages": "hi"}, "non-empty array", "messages"),
]


def test_bad_requests_get_400_with_an_openai_error(server, client):
    for body, message, param in BAD:
        chat = isinstance(body, dict) and "messages" in body
        url = server["url"] + ("/v1/chat/completions" if chat else "/v1/completions")
        r = httpx.post(url, content=body if isinstance(body, bytes) else json.dumps(body),
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error", (body, error)
        assert param is None or error["param"] == param
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(server["url"] + "/v1/nothing").json()["error"]["type"] == "not_found_error"


def test_a_client_leaving_mid_stream_frees_its_row_and_a_burst_over_the_queue_gets_503(server, client, reference):
    url = server["url"] + "/v1/completions"
    long = {"model": "demo", "prompt": [5, 6, 7], "max_tokens": 250, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", url, json=long) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one chunk, then the client goes away

    async def burst():
        count = BATCH + QUEUE + 24
        answered, everyone = [0], asyncio.Event()
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            async def one():
                async with http.stream("POST", url, json=long) as r:
                    body = (await r.aread()) if r.status_code != 200 else b""
                    answered[0] += 1
                    if answered[0] == count:
                        everyone.set()
                    if r.status_code == 200:  # a 200 stream is held until every request is answered, then left:
                        await everyone.wait()  # its request is cancelled
                    return r.status_code, r.headers.get("retry-after"), body
            return await asyncio.gather(*(one() for _ in range(count)))

    answers = asyncio.run(burst())
    refused = [a for a in answers if a[0] == 503]
    assert refused and all(a[0] in (200, 503) for a in answers)
    assert all(a[1] == "1" and json.loads(a[2])["error"]["code"] == "queue_full" for a in refused)

    deadline = time.time() + 60  # every cancelled request's row comes back
    while time.time() < deadline:
        metrics = _metrics(server)
        if _metric(metrics, "eagle3_running_requests") == 0 and _metric(metrics, "eagle3_queue_depth") == 0:
            break
        time.sleep(0.5)
    assert _metric(metrics, "eagle3_running_requests") == 0
    assert _metric(metrics, "eagle3_rejected_requests_total") == len(refused)
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    out = client.completions.create(model="demo", prompt=[5, 6, 7], max_tokens=8, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == reference([5, 6, 7], 8)[0]


def test_the_engine_fails_a_request_alone_when_its_sink_breaks(generator, reference):
    """In this process, on the server's programs: a request whose text can not be made ends with 'error'
    while its batch-mates finish with their own tokens; static admission gives the same tokens."""
    import threading

    from eagle3_jax.serve.engine import BatchEngine, EngineRequest

    class Sink:
        def __init__(self, broken=False):
            self.ids, self.broken, self.done = [], broken, threading.Event()

        def tokens(self, ids):
            if self.broken:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "broken vocabulary")
            self.ids += ids
            return len(self.ids) >= 5 and self.stop_early

        def finish(self, reason, stats):
            self.reason, self.stats = reason, stats
            self.done.set()

    for admission in ("continuous", "static"):
        engine = BatchEngine(generator, max_batch=BATCH, max_cache_len=CACHE, chunk=2, admission=admission)
        engine.start()
        try:
            jobs = []
            for i, stop_early in enumerate([False, True, False, False]):
                sink = Sink(broken=i == 2)
                sink.stop_early = stop_early  # ends the request as a stop string does
                request = EngineRequest(prompt=[3 + i, 7, 11 + i], max_tokens=20, sink=sink,
                                        stop_ids=generator.config.eos_token_ids)
                engine.submit(request)
                jobs.append((request, sink))
            for _, sink in jobs:
                assert sink.done.wait(120)
            assert [s.reason for _, s in jobs] == ["length", "stop", "error", "length"], admission
            assert "could not be turned into text" in jobs[2][0].error
            for request, sink in (jobs[0], jobs[3]):
                assert sink.ids == reference(request.prompt, 20)[0]
            assert jobs[1][1].ids[:5] == reference(jobs[1][0].prompt, 5)[0]
            assert engine.error is None and engine.running() == 0
        finally:
            engine.stop()


# ------------------------------------------------------------------ hostile and careless clients

class HealthWatch:
    """Polls /health from a thread while a block runs and keeps each answer's latency (seconds)."""

    def __init__(self, url: str, every: float = 0.02):
        self.url, self.every, self.latencies, self.failures = url + "/health", every, [], 0
        self._stop = threading.Event()

    def __enter__(self):
        def poll():
            with httpx.Client(timeout=30) as http:
                while not self._stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        ok = http.get(self.url).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    self.latencies.append(time.perf_counter() - t0)
                    self.failures += not ok
                    self._stop.wait(self.every)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(60)

    @property
    def worst(self) -> float:
        return max(self.latencies, default=0.0)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _post(url: str, body, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(url, content=content, headers={"Content-Type": "application/json"}, timeout=timeout)


def _raw(server, data: bytes, *, wait: float = 10) -> tuple[bytes, float]:
    """Sends ``data`` on a new connection and reads until the server closes it: (what it said, seconds)."""
    host, port = server["url"].removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # it answered (and closed) before reading it all
            pass
        s.settimeout(wait)
        t0, answer = time.perf_counter(), b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer, time.perf_counter() - t0


def _hostile_cases(server) -> list[tuple[str, bytes | dict, int, str, str | None]]:
    """(route, body, status, what the message says, param) for requests past each limit."""
    chat, comp = "/v1/chat/completions", "/v1/completions"
    hello = [{"role": "user", "content": "hi"}]
    nested: list = [1]
    for _ in range(16):
        nested = [nested]
    return [
        (comp, {"model": "demo", "prompt": "x" * 20_001}, 400, "--max-prompt-chars", "prompt"),
        (comp, {"model": "demo", "prompt": "x " * 499_000}, 400, "--max-prompt-chars", "prompt"),  # a maximal body
        (chat, {"model": "demo", "messages": hello * 65}, 400, "--max-messages", "messages"),
        (chat, {"model": "demo", "messages": [{"role": "user", "content": "y" * 19_000}, {"role": "user",
                "content": "y" * 1_001}]}, 400, "--max-prompt-chars", "messages"),
        (chat, {"model": "demo", "messages": hello, "chat_template_kwargs": {"chat_template": "{{ 'pwned' }}"}},
         400, "can not set chat_template", "chat_template_kwargs"),
        (chat, {"model": "demo", "messages": hello, "chat_template_kwargs": {"tools": [{"x": 1}]}}, 400,
         "can not set tools", "chat_template_kwargs"),
        (chat, {"model": "demo", "messages": hello, "chat_template_kwargs": []}, 400, "must be an object",
         "chat_template_kwargs"),
        (comp, {"model": "demo", "prompt": "x", "x": nested}, 400, "nested more than 16", "x"),
        (comp, b"[" * 200_000 + b"]" * 200_000, 400, "nested more than 16", None),
        (comp, b'{"model": "\\ud800", "prompt": "x"}', 400, "lone surrogate", "model"),
        (chat, b'{"model": "demo", "messages": [{"role": "user", "content": "a\\udfffb"}]}', 400, "lone surrogate",
         "messages"),
        (comp, {"model": "demo", "prompt": "x", "stop": list("abcde")}, 400, "--max-stop-strings", "stop"),
        (comp, {"model": "demo", "prompt": "x", "stop_token_ids": False}, 400, "token ids", "stop_token_ids"),
        (comp, {"model": "demo", "prompt": "x", "stop_token_ids": [99999]}, 400, "outside the vocabulary",
         "stop_token_ids"),
        (comp, {"model": "demo", "prompt": [1, 99999]}, 400, "outside the vocabulary", "prompt"),
        (comp, {"model": "demo", "prompt": "x", "max_tokens": int("9" * 30)}, 400, "at most", "max_tokens"),
        (comp, b'{"model": "demo", "prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400, "not valid JSON", None),
        (comp, {"model": "demo", "prompt": "x" * 1_000_001}, 413, "--max-body-bytes", None),
    ]


def test_hostile_requests_get_a_4xx_naming_the_limit_while_health_stays_fast(server):
    with HealthWatch(server["url"]) as watch:
        for route, body, status, message, param in _hostile_cases(server):
            r = _post(server["url"] + route, body)
            assert r.status_code == status, (route, str(body)[:80], r.text[:300])
            error = r.json()["error"]
            assert message in error["message"] and error["param"] == param, (str(body)[:80], error)
        # A body past the limit sent in chunks (no Content-Length) is cut off as it arrives.
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
               b"Transfer-Encoding: chunked\r\n\r\n"
        piece = b"40000\r\n" + b" " * 0x40000 + b"\r\n"
        answer, _ = _raw(server, head + piece * 5)
        assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer, answer[:300]
    assert watch.failures == 0 and watch.latencies and watch.worst < 1.0, watch.worst
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


def test_a_chat_template_that_runs_too_long_is_interrupted_and_the_server_goes_on(server, client):
    url = server["url"] + "/v1/chat/completions"
    spin = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"spin": True}}

    async def spins(n):
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(http.post(url, json=spin) for _ in range(n)))

    with HealthWatch(server["url"]) as watch:
        t0 = time.perf_counter()
        answers = asyncio.run(spins(5))  # more than the server's 4 preparation workers
        elapsed = time.perf_counter() - t0
    codes = sorted(r.json()["error"]["code"] for r in answers)
    # Four ran their 2 s on the four workers and were interrupted; the fifth waited for a worker, and either
    # got one and was interrupted too, or was told the server is busy when none was free within 2 s.
    assert codes[:4] == ["prepare_timeout"] * 4 and codes[4] in ("prepare_timeout", "server_busy"), codes
    for r in answers:
        assert r.status_code == (400 if r.json()["error"]["code"] == "prepare_timeout" else 503), r.text
    assert 2.0 <= elapsed < 30, elapsed
    assert watch.failures == 0 and len(watch.latencies) >= 10 and watch.worst < 1.0, watch.worst
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_non_streamed_clients_that_time_out_free_their_rows_at_once(server, client, reference):
    url = server["url"] + "/v1/completions"
    long = {"model": "demo", "prompt": [5, 6, 7], "max_tokens": 250, "temperature": 0, "ignore_eos": True}

    outcomes = []

    def impatient():
        try:
            outcomes.append(httpx.post(url, json=long, timeout=0.5).status_code)
        except httpx.TimeoutException:
            outcomes.append("gave up")

    threads = [threading.Thread(target=impatient) for _ in range(BATCH)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outcomes == ["gave up"] * BATCH, outcomes
    left = time.perf_counter()
    while time.perf_counter() - left < 30:
        health = httpx.get(server["url"] + "/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.02)
    freed = time.perf_counter() - left
    assert health["running"] == 0 and health["waiting"] == 0 and freed < 2.0, (health, freed)
    out = client.completions.create(model="demo", prompt=[5, 6, 7], max_tokens=16, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == reference([5, 6, 7], 16)[0]


def test_slow_clients_are_cut_off(server):
    # headers trickled in, or none at all: the connection is closed after --header-timeout (2 s)
    for data in (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", b""):
        answer, seconds = _raw(server, data, wait=30)
        assert answer == b"" and 1.5 < seconds < 10, (data, answer, seconds)
    # a body that never completes: 408 after --body-timeout (2 s)
    answer, seconds = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 1000\r\n\r\n{\"model\": ", wait=30)
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer and 1.5 < seconds < 10, answer


def test_sampling_values_too_small_for_float32_are_their_limits(client):
    def ids(**kwargs):
        out = client.completions.create(model="demo", prompt=[5, 6, 7], max_tokens=16, seed=5,
                                        extra_body={"return_token_ids": True}, **kwargs)
        return out.choices[0].model_extra["token_ids"]

    greedy = ids(temperature=0)
    assert ids(temperature=1e-40) == greedy  # 0 in float32: a greedy row
    assert ids(temperature=1e-30) == greedy  # a sampled row at a tiny normal temperature: its limit
    assert ids(temperature=1.0, top_p=1e-45) == greedy  # top-p below every probability: the top token


@pytest.mark.slow
def test_soak_time_and_memory_stay_bounded_under_maximal_requests(server, client, reference):
    """Rounds of every refused maximal request, concurrently: the server's memory comes back to where it was,
    /health answers within a second throughout, and it still gives the right tokens."""
    cases = [c for c in _hostile_cases(server) if c[2] in (400, 413)]
    pid = server["proc"].pid
    _post(server["url"] + cases[0][0], cases[0][1])  # first use of each path: allocations that stay
    before, peak = _rss_mb(pid), 0.0

    async def one_round():
        async with httpx.AsyncClient(timeout=60) as http:
            async def send(route, body):
                content = body if isinstance(body, bytes) else json.dumps(body)
                return (await http.post(server["url"] + route, content=content,
                                        headers={"Content-Type": "application/json"})).status_code
            return await asyncio.gather(*(send(c[0], c[1]) for c in cases))

    with HealthWatch(server["url"]) as watch:
        for _ in range(6):
            statuses = asyncio.run(one_round())
            assert statuses == [c[2] for c in cases]
            peak = max(peak, _rss_mb(pid))
    after = _rss_mb(pid)
    print(f"\nserver RSS {before:.0f} MB before, {peak:.0f} MB at most between rounds, {after:.0f} MB after; "
          f"/health worst {watch.worst * 1000:.0f} ms over {len(watch.latencies)} polls")
    assert after - before < 300 and peak - before < 600, (before, peak, after)
    assert watch.failures == 0 and watch.worst < 1.0
    out = client.completions.create(model="demo", prompt=[9, 10, 11], max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == reference([9, 10, 11], 12)[0]


# ------------------------------------------------------------------ the process: start-up and shutdown

def _serve_process(server, *extra: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "eagle3_jax", "serve", "--target", server["target"], "--draft",
                             server["head"], "--port", "0", "--json", "--max-batch", str(BATCH), "--max-cache-len",
                             str(CACHE), "--warmup-buckets", "16", *extra],
                            stdout=stdout, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_shutdown_ends_the_requests_in_flight_with_an_error_body(server):
    proc = _serve_process(server)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        url = json.loads(proc.stdout.readline())["url"]
        long = {"model": os.path.basename(server["target"]), "prompt": [5, 6, 7], "max_tokens": CACHE - 4,
                "temperature": 0, "ignore_eos": True}
        results: list = []

        def whole():
            r = httpx.post(url + "/v1/completions", json=long, timeout=60)
            results.append(("whole", r.status_code, r.json()))

        def streamed():
            with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True}, timeout=60) as r:
                lines = [line for line in r.iter_lines() if line]
            results.append(("stream", r.status_code, lines))

        threads = [threading.Thread(target=f) for f in [whole] * (BATCH + 1) + [streamed]]  # 2 more than rows
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while time.time() < deadline:  # every request queued or running
            health = httpx.get(url + "/health").json()
            if health["running"] + health["waiting"] == BATCH + 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert len(results) == BATCH + 2
    for kind, status, body in results:
        if kind == "whole":
            assert status == 503 and body["error"]["code"] == "server_shutting_down", body
        else:  # the stream had started (200): an error event, then [DONE]
            assert status == 200 and lines_end_with_error(body), body
    assert err.count("ended with 503") == 1 and f"shutting down: {BATCH + 2} requests" in err, err[-2000:]
    assert "Traceback" not in err and "Exception" not in err, err[-3000:]


def lines_end_with_error(lines: list[str]) -> bool:
    return lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "server_shutting_down"


@pytest.mark.slow
def test_ctrl_c_or_sigterm_at_any_moment_of_start_up_stops_the_server(server):
    """Signals land in imports, loading, compiling and serving (one process per moment, from about when the
    command's own code runs; before it, Python's start-up answers as it always does): each process stops
    promptly, with 130 during start-up and 0 once serving, and none keeps serving."""
    for at, sig in [(0.8, signal.SIGINT), (2.0, signal.SIGTERM), (4.5, signal.SIGINT)]:
        proc = _serve_process(server, stdout=subprocess.DEVNULL)
        try:
            time.sleep(at)
            proc.send_signal(sig)
            code = proc.wait(60)  # a swallowed signal would leave it serving: a timeout here
        finally:
            proc.kill()
        err = proc.stderr.read()
        last = err.strip().splitlines()[-1] if err.strip() else ""
        served = "serving " in err  # the signal came once it served: a graceful stop
        assert (code, last) == ((0, "stopped") if served else (130, "interrupted")), (at, sig, code, err[-1500:])
        assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]


# ------------------------------------------------------------------ no server

def test_reasoning_split_streamed_piece_by_piece_equals_the_whole():
    for text, opened in [("<think>\nplan it</think>\n\nThe answer.", False), ("plan it\n</think>\n\nDone", True),
                         ("just an answer", False), ("still thinking", True), ("  <think>a</th", False)]:
        for step in (1, 3, 100):
            splitter = ReasoningSplitter(opened)
            parts = [splitter.feed(text[i:i + step]) for i in range(0, len(text), step)] + [splitter.feed("", True)]
            reasoning = "".join(p.reasoning for p in parts).strip()
            content = "".join(p.content for p in parts).strip()
            want_reasoning, want_answer = reasoning_and_answer(text, opened)
            assert (reasoning or None, content) == (want_reasoning or None, want_answer), (text, step)


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    pieces = {1: "ab", 2: "\ufffd", 3: "c", 4: "<", 5: "/x", 6: "d", 9: ""}

    def decode(ids):  # token 2 is the first byte of a character that token 3 completes
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdc", "é")

    stream = TextStream(decode, stops=("</x>",), stop_ids=(9,))
    sent = []
    for ids in ([1, 2], [3, 4], [5], [6], [9]):
        delta, stop = stream.add(ids)
        sent.append(delta.content)
        assert not stop
    sent.append(stream.finish().content)
    assert sent == ["", "abé", "", "</xd", "", ""]  # "ab" waits with the partial character after it
    stream = TextStream(decode, stops=("</x",))
    delta, stop = stream.add([1, 4, 5, 6])
    assert stop and delta.content == "ab" and stream.kept_tokens == 1


def test_parse_request_refuses_what_it_can_not_honour():
    ok = parse_request({"model": "m", "prompt": [1, 2], "stop": ["a", 7], "seed": 3, "top_k": -1},
                       chat=False, model_names=("m",), defaults=Defaults())
    assert ok.stop == ("a",) and ok.stop_token_ids == (7,) and ok.top_k == 0 and ok.seed == 3
    assert ok.temperature == 1.0 and ok.max_tokens is None
    for body, message in [({"model": "m", "prompt": ["a", "b"]}, "one prompt per request"),
                          ({"model": "m", "prompt": "a", "logprobs": 2}, "not supported"),
                          ({"model": "m", "prompt": "a", "stream": "yes"}, "true or false"),
                          ({"model": "m", "prompt": "a", "top_p": 0}, "> 0.0"),
                          ({"prompt": "a"}, "'model' is required"), ([], "JSON object")]:
        with pytest.raises(APIError, match=message):
            parse_request(body, chat=False, model_names=("m",), defaults=Defaults())


def test_serve_refuses_a_port_in_use(capsys):
    import socket

    from eagle3_jax.cli import main
    from eagle3_jax.demo import demo_paths

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--target", demo_paths("toy")[0], "--port", str(port)]) == 1
    assert "can not listen on 127.0.0.1:" in capsys.readouterr().err


if os.name != "posix":  # select() on a pipe
    pytestmark = pytest.mark.skip("the server tests need POSIX pipes")
