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
import subprocess
import sys
import tempfile
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
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
            "{% if enable_thinking %}{{ '<think>\\n' }}{% endif %}{% endif %}")


_server: dict | None = None


def start_server() -> dict:
    """Starts the server process (once); conftest.py calls this as soon as the tests are collected, so that
    its start-up (loading, compiling) runs beside the tests before this module's."""
    global _server
    if _server is None:
        from eagle3_jax.demo import demo_paths

        target, head = demo_paths()
        work = tempfile.mkdtemp(prefix="eagle3-jax-serve-test-")
        template = os.path.join(work, "chatml.jinja")
        with open(template, "w") as f:
            f.write(TEMPLATE)
        log = open(os.path.join(work, "server.log"), "w+")
        proc = subprocess.Popen(
            [sys.executable, "-m", "eagle3_jax", "serve", "--target", target, "--draft", head, "--port", "0",
             "--json", "--max-batch", str(BATCH), "--max-cache-len", str(CACHE), "--max-queue", str(QUEUE),
             "--chat-template", template, "--reasoning-parser", "qwen3", "--served-model-name", "demo",
             "--warmup-buckets", "16,32,64"],
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
        async with httpx.AsyncClient(timeout=60) as http:
            async def one():
                async with http.stream("POST", url, json=long) as r:
                    return r.status_code, r.headers.get("retry-after"), (await r.aread()) if r.status_code != 200 \
                        else b""  # a 200 stream is left at once: its request is cancelled
            return await asyncio.gather(*(one() for _ in range(BATCH + QUEUE + 24)))

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
        assert main(["serve", "--target", demo_paths()[0], "--port", str(port)]) == 1
    assert "can not listen on 127.0.0.1:" in capsys.readouterr().err


if os.name != "posix":  # select() on a pipe
    pytestmark = pytest.mark.skip("the server tests need POSIX pipes")
