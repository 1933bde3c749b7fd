"""What a client may send the server, checked in this process (no model): the JSON decoder's depth and
Unicode checks, every request field's type and range under generated bodies, the limits on prompts,
messages and stop strings, reserved chat-template arguments, the interruptible preparation workers, and
the multi-host rendezvous. The live server's side of the same classes is in tests/test_serve.py."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eagle3_jax.errors import InputError
from eagle3_jax.serve.limits import check_json, decode_json, default_prompt_chars
from eagle3_jax.serve.offload import Offloader, PrepareTimeout
from eagle3_jax.serve.protocol import APIError, Defaults, Limits, Parsed, parse_request
from eagle3_jax.text import check_template_kwargs, reserved_template_kwargs

VOCAB = 1000
LIMITS = Limits(max_prompt_chars=500, max_messages=8, max_stop_strings=3, max_stop_chars=20, max_json_depth=6)


def parse(body, chat=False, limits=LIMITS) -> Parsed:
    return parse_request(body, chat=chat, model_names=("m",), defaults=Defaults(), limits=limits,
                         vocab_size=VOCAB)


# ------------------------------------------------------------------ JSON: depth, Unicode

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=20)


def depth_of(value) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


@settings(max_examples=150, deadline=None)
@given(value=json_values, wrap=st.integers(0, 8))
def test_decode_json_refuses_exactly_the_bodies_nested_too_deep(value, wrap):
    for _ in range(wrap):
        value = [value]
    body = {"model": "m", "x": value}
    raw = json.dumps(body).encode()
    if depth_of(body) > LIMITS.max_json_depth:
        with pytest.raises(APIError, match="nested more than 6 levels") as e:
            decode_json(raw, LIMITS)
        assert e.value.status == 400 and e.value.param == "x" and e.value.code == "too_deep"
    else:
        assert decode_json(raw, LIMITS) == body


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=12), at=st.integers(0, 12), surrogate=st.integers(0xD800, 0xDFFF),
       field=st.sampled_from(["model", "prompt", "stop", "messages"]))
def test_a_lone_surrogate_anywhere_is_a_400_naming_its_field(text, at, surrogate, field):
    bad = text[:at] + chr(surrogate) + text[at:]
    value = {"stop": [bad], "messages": [{"role": "user", "content": bad}]}.get(field, bad)
    raw = json.dumps({"model": "m", field: value}).encode()  # ASCII, with the surrogate as JSON's \\udXXX escape
    with pytest.raises(APIError, match="lone surrogate") as e:
        decode_json(raw, LIMITS)
    assert e.value.status == 400 and e.value.param == field
    json.dumps(e.value.body(), ensure_ascii=False).encode("utf-8")  # the error itself is valid UTF-8: no 500


@pytest.mark.parametrize("raw, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nested more than"),  # the C decoder's recursion limit
    (b'{"model": "m", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),  # int digit limit
    (b'{"model": "m", "prompt": "\xff\xfe"}', "not valid JSON"),  # not UTF-8
    (b'{"model": "m", "prompt": ', "not valid JSON"),
])
def test_decode_json_answers_400_to_what_python_can_not_decode(raw, message):
    with pytest.raises(APIError, match=message) as e:
        decode_json(raw, LIMITS)
    assert e.value.status == 400


def test_check_json_is_iterative():
    deep: list = []
    for _ in range(50_000):  # far past Python's recursion limit
        deep = [deep]
    with pytest.raises(APIError, match="nested more than 10"):
        check_json({"a": deep}, 10)


# ------------------------------------------------------------------ request fields under generated bodies

# field -> the JSON types a value may have (besides null, which is "absent")
FIELD_TYPES = {
    "max_tokens": (int,), "temperature": (int, float), "top_p": (int, float), "top_k": (int,), "seed": (int,),
    "stream": (bool,), "ignore_eos": (bool,), "return_token_ids": (bool,), "stream_options": (dict,),
    "chat_template_kwargs": (dict,), "stop": (str, list), "stop_token_ids": (list,), "n": (int,),
    "best_of": (int,), "logprobs": (bool, int), "top_logprobs": (int,), "tools": (list,), "functions": (list,),
    "logit_bias": (dict,), "presence_penalty": (int, float), "frequency_penalty": (int, float), "echo": (bool,),
    "suffix": (str,), "response_format": (dict,),
}

any_json = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.sampled_from([10**400, -(10**400), 2**64])
            | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, 1, 0.0, 1e-45, 1e-40, 5e-324,
                                                                                 3e38, 1e308, -0.0, 2.0, 2.0000001])
            | st.text(max_size=5) | st.lists(st.integers(-5, 2 * VOCAB), max_size=4)
            | st.dictionaries(st.text(max_size=4), st.booleans(), max_size=2))


def json_type_ok(value, types) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int):
        return int in types
    if isinstance(value, float):
        return float in types
    return isinstance(value, types)


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(sorted(FIELD_TYPES)), value=any_json, chat=st.booleans())
def test_one_bad_field_is_a_400_naming_it_and_a_good_one_parses(field, value, chat):
    body = {"model": "m", field: value}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    try:
        parsed = parse(body, chat=chat)
    except APIError as e:
        assert e.status == 400 and e.message and e.param == field, (field, value, e.message, e.param)
        return
    # Accepted: the value was absent or of an allowed type, and it is honoured as given.
    assert value is None or json_type_ok(value, FIELD_TYPES[field]), (field, value)
    if field == "temperature" and value is not None:
        assert 0 <= parsed.temperature <= 2 and math.isfinite(parsed.temperature)
    if field == "top_p" and value is not None:
        assert 0 < parsed.top_p <= 1
    if field in ("stop_token_ids", "stop") and isinstance(value, list):
        assert all(0 <= t < VOCAB for t in parsed.stop_token_ids)


@settings(max_examples=150, deadline=None)
@given(limit=st.integers(1, 300), chars=st.integers(0, 310), messages=st.integers(1, 12), stops=st.integers(0, 6),
       stop_len=st.integers(1, 30), chat=st.booleans())
def test_sizes_are_refused_exactly_past_their_limits(limit, chars, messages, stops, stop_len, chat):
    limits = Limits(max_prompt_chars=limit, max_messages=8, max_stop_strings=3, max_stop_chars=20)
    text = "é" * chars  # characters, not bytes
    if chat:
        body = {"model": "m", "messages": [{"role": "user", "content": text}] + [{"role": "user"}] * (messages - 1)}
    else:
        body = {"model": "m", "prompt": text or "x"}
    body["stop"] = [str(i).rjust(stop_len, "s") for i in range(stops)]
    counted = chars + 4 * messages if chat else max(chars, 1)  # every string of the messages: roles too
    over = {"messages": chat and messages > 8, "prompt": counted > limit,
            "stop": stops > 3 or (stops > 0 and stop_len > 20)}
    try:
        parse(body, chat=chat, limits=limits)
    except APIError as e:
        field = "messages" if chat and e.param == "messages" else e.param
        assert e.status == 400 and (over.get(field) or (field == "messages" and over["prompt"])), (e.message, over)
        return
    assert not any(over.values()), over


@pytest.mark.parametrize("body, param, message", [
    ({"model": "m", "prompt": "x", "chat_template_kwargs": []}, "chat_template_kwargs", "must be an object"),
    ({"model": "m", "prompt": "x", "stop_token_ids": False}, "stop_token_ids", "list of integer token ids"),
    ({"model": "m", "prompt": "x", "stream_options": False}, "stream_options", "must be an object"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "must be true or false"),
    ({"model": "m", "prompt": "x", "temperature": 10**400}, "temperature",
     "<= 2.0, got 10000000000000000000...(401 digits)"),
    ({"model": "m", "prompt": "x", "seed": -(10**400)}, "seed", "at least 0, got -1000000000000000000...(401 digits)"),
    ({"model": "m", "prompt": "x", "tools": False}, "tools", "must be an array"),
    ({"model": "m", "prompt": "x", "n": "1"}, "n", "must be an integer"),
    ({"model": "m", "prompt": "x", "temperature": float("nan")}, "temperature", "finite number"),
    ({"model": "m", "prompt": [1, VOCAB]}, "prompt", "outside the vocabulary"),
    ({"model": "m", "prompt": "x", "stop": [7, VOCAB + 1]}, "stop", "outside the vocabulary"),
    ({"model": "m", "prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids", "outside the vocabulary"),
    ({"model": "m", "prompt": "x" * 501}, "prompt", "at most 500 (--max-prompt-chars"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d"]}, "stop", "at most 3 (--max-stop-strings)"),
    ({"model": "m", "prompt": "x", "stop": ["y" * 21]}, "stop", "at most 20 (--max-stop-chars)"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}] * 9}, "messages", "at most 8 (--max-messages)"),
    ({"model": "m", "messages": [{"role": "user", "content": "x" * 300, "reasoning_content": "y" * 201}]},
     "messages", "the messages have 505 characters"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"chat_template": "x"}},
     "chat_template_kwargs", "can not set chat_template"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"range": 1}},
     "chat_template_kwargs", "can not set range"),
])
def test_the_remaining_error_cases_name_their_field(body, param, message):
    with pytest.raises(APIError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        parse(body, chat="messages" in body)
    assert e.value.status == 400 and e.value.param == param


def test_reserved_template_arguments_cover_the_machinery():
    reserved = reserved_template_kwargs()
    for name in ("chat_template", "tools", "documents", "messages", "add_generation_prompt", "tokenize",
                 "continue_final_message", "bos_token", "eos_token", "range", "namespace", "raise_exception"):
        assert name in reserved, name
        with pytest.raises(InputError, match=f"can not set {name}"):
            check_template_kwargs({name: 1})
    assert check_template_kwargs({"enable_thinking": False}) == {"enable_thinking": False}


def test_the_python_api_refuses_a_template_argument_and_a_lone_surrogate(tmp_path):
    from eagle3_jax import Generator, load_target
    from eagle3_jax.demo import demo_paths

    gen = Generator(load_target(demo_paths("toy")[0]))
    with pytest.raises(InputError, match="lone surrogate \\(U\\+D800 at character 2\\)"):
        gen.generate("ab\ud800", max_new_tokens=2)
    with pytest.raises(InputError, match="can not set chat_template"):
        gen.generate([{"role": "user", "content": "hi"}], max_new_tokens=2,
                     chat_template_kwargs={"chat_template": "{% for i in range(99999) %}{% endfor %}"})


def test_the_default_prompt_limit_is_what_the_cache_could_never_hold():
    class Tok:
        def get_vocab(self):
            return {"a": 0, "abcdefgh": 1, "<|im_start|>": 2}

    assert default_prompt_chars(100, Tok()) == 4 * 100 * 12
    assert default_prompt_chars(100, None) == 4 * 100 * 64


# ------------------------------------------------------------------ preparation off the event loop

def test_a_job_past_its_deadline_is_interrupted_and_its_worker_comes_back():
    def spin():
        while True:
            pass

    def swallowing():
        try:
            while True:
                pass
        except Exception:  # the interruption is a BaseException: not caught here
            return "swallowed"

    async def main():
        offload = Offloader(workers=2, timeout=0.3)
        gaps = []

        async def tick():  # the event loop keeps running meanwhile: the gaps between its ticks stay short
            last = time.perf_counter()
            for _ in range(10):
                await asyncio.sleep(0.03)
                gaps.append(time.perf_counter() - last)
                last = time.perf_counter()

        t0 = time.perf_counter()
        results = await asyncio.gather(offload.run(spin), offload.run(swallowing), tick(), return_exceptions=True)
        elapsed = time.perf_counter() - t0
        assert isinstance(results[0], PrepareTimeout) and isinstance(results[1], PrepareTimeout), results
        assert max(gaps) < 0.25 and elapsed < 5, (gaps, elapsed)
        for _ in range(4):  # both workers are free again (each call would wait for a slot otherwise)
            assert await offload.run(sum, [1, 2, 3]) == 6
        with pytest.raises(ZeroDivisionError):
            await offload.run(lambda: 1 / 0)
        task = asyncio.ensure_future(offload.run(spin))  # a caller that goes away interrupts its job too
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(offload.run(lambda: 42), 5) == 42
        offload.shutdown()

    asyncio.run(main())
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name.startswith("eagle3-jax-prepare")]


# ------------------------------------------------------------------ several processes: the rendezvous

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_rendezvous_names_the_coordinator_and_the_missing_processes():
    from eagle3_jax.distributed import rendezvous

    port = _free_port()
    address = f"127.0.0.1:{port}"
    errors: dict[int, str] = {}

    def run(pid, n=3, timeout=1.5):
        try:
            rendezvous(address, n, pid, timeout)
        except InputError as e:
            errors[pid] = str(e)

    threads = [threading.Thread(target=run, args=(pid,)) for pid in (0, 2)]  # process 1 never comes
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert f"process 1 of 3 did not join within 1.5 s (--distributed-timeout), at the coordinator {address}" \
        in errors[0]
    assert "process 1 of 3 did not join" in errors[1 + 1]

    errors.clear()  # everyone comes, in any order: no error
    threads = [threading.Thread(target=run, args=(pid, 3, 10)) for pid in (2, 1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == {}

    errors.clear()  # a process started with another --num-processes
    threads = [threading.Thread(target=run, args=(0, 2, 10)), threading.Thread(target=run, args=(1, 3, 10))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert "started with --num-processes 3, process 0 with 2" in errors[0]
    assert "--num-processes 3" in errors[1]

    errors.clear()
    run(1, 2, 0.5)  # no coordinator at all
    assert f"the coordinator {address} (process 0) could not be reached within 0.5 s" in errors[1]


def test_initialize_binds_the_coordinator_it_was_given(monkeypatch):
    import jax

    from eagle3_jax import distributed

    seen = {}

    def fake(coordinator_address=None, num_processes=None, process_id=None, initialization_timeout=300,
             coordinator_bind_address=None):  # jax.distributed.initialize's parameters that matter here
        seen.update(initialization_timeout=initialization_timeout, coordinator_bind_address=coordinator_bind_address)

    monkeypatch.setattr(jax.distributed, "initialize", fake)
    monkeypatch.setattr(distributed, "_initialized", False)
    distributed.initialize("127.0.0.1:1234", 1, 0, timeout=7)
    assert seen["coordinator_bind_address"] == "127.0.0.1:1234" and seen["initialization_timeout"] == 7


def test_a_distributed_run_whose_peer_never_comes_is_one_error_line(tmp_path):
    from eagle3_jax.demo import demo_paths

    port = _free_port()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "eagle3_jax", "generate", "--target", demo_paths("toy")[0],
                           "--prompt-ids", "1,2", "--distributed", "--coordinator", f"127.0.0.1:{port}",
                           "--num-processes", "2", "--process-id", "0", "--distributed-timeout", "2"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: the distributed run did not start: process 1 of 2 did not join within 2 s")
    assert f"127.0.0.1:{port}" in lines[-1] and "Traceback" not in done.stderr
    assert time.perf_counter() - t0 < 60


# ------------------------------------------------------------------ the command line

def test_serve_options_are_checked_before_anything_loads(capsys):
    from eagle3_jax.cli import main
    from eagle3_jax.cli.serve import http_url

    for argv, message in [(["--port", "70000"], "a port number in [0, 65535]"),
                          (["--prepare-timeout", "0"], "expected a positive number"),
                          (["--max-body-bytes", "-1"], "a positive integer")]:
        with pytest.raises(SystemExit) as e:
            main(["serve", "--target", "x", *argv])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    assert http_url("::1", 8000) == "http://[::1]:8000" and http_url("127.0.0.1", 80) == "http://127.0.0.1:80"


def test_the_command_line_defaults_are_the_limits_defaults():
    """The parser imports no JAX, so it can not read Limits' defaults: this keeps the two equal."""
    from eagle3_jax.cli import build_parser
    from eagle3_jax.cli.serve import limits_of

    args = build_parser().parse_args(["serve", "--target", "x"])
    assert limits_of(args) == Limits()
