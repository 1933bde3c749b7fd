"""JAX's persistent compilation cache (eagle3_jax.compile_cache) and the compile messages.

A second process must load a program the first one compiled: checked on the
cache directory's content and on JAX's own cache-hit events (through
CompileEvent.from_cache), never on timings.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import warnings

import pytest

from eagle3_jax import compile_cache

# A program in the shape of the decode loops: static settings, a while_loop, a donated state.
SCRIPT = textwrap.dedent('''
    import dataclasses, json, os, sys
    import jax, jax.numpy as jnp
    from eagle3_jax import compile_cache
    from eagle3_jax.compiled import CompiledFunction, add_compile_listener

    @dataclasses.dataclass(frozen=True)
    class Settings:
        steps: int

    def loop(settings, state, w):
        def body(c):
            i, x = c
            return i + 1, jnp.tanh(x @ w)
        return jax.lax.while_loop(lambda c: c[0] < settings.steps, body, (0, state))[1]

    events = []
    add_compile_listener(events.append)
    with_cache = sys.argv[1] == "on"
    used = compile_cache.enable(None if with_cache else False)
    fn = CompiledFunction(loop, num_static=1, donate_argnums=(1,), describe="the test loop")
    out, seconds = fn(Settings(3), jnp.ones((8, 8)), jnp.full((8, 8), 0.1))
    print(json.dumps(dict(cache_dir=used, value=float(out[0, 0]), seconds=seconds,
                          events=[dataclasses.asdict(e) for e in events])))
''')


def run_script(tmp_path, env_cache: str, mode: str = "on") -> dict:
    env = dict(os.environ, EAGLE3_JAX_COMPILE_CACHE=env_cache, XDG_CACHE_HOME=str(tmp_path / "xdg"),
               HOME=str(tmp_path / "home"), JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), stderr=done.stderr)


def entries(path: pathlib.Path) -> set[str]:
    return {p.name for p in path.glob("*-cache")} if path.is_dir() else set()


def test_a_second_process_loads_the_program_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = run_script(tmp_path, str(cache))
    assert first["cache_dir"] == str(cache)
    written = entries(cache)
    assert any(name.startswith("jit_loop-") for name in written), written
    assert [(e["what"], e["done"], e["from_cache"]) for e in first["events"]] == [
        ("the test loop", False, False), ("the test loop", True, False)]

    second = run_script(tmp_path, str(cache))
    assert second["value"] == first["value"]
    assert second["events"][-1]["from_cache"] is True  # every XLA compilation was a hit of JAX's cache
    assert entries(cache) == written  # same keys in another process: nothing new written


@pytest.mark.slow
def test_opting_out_writes_nothing(tmp_path):
    out = run_script(tmp_path, "off")  # EAGLE3_JAX_COMPILE_CACHE=off (the other spellings: below)
    assert out["cache_dir"] is None and out["events"][-1]["from_cache"] is False
    out = run_script(tmp_path, str(tmp_path / "cache"), mode="off")  # Generator(compile_cache=False)
    assert out["cache_dir"] is None
    assert not (tmp_path / "cache").exists() and not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


def test_an_unwritable_directory_warns_once_and_compiles(tmp_path):
    (tmp_path / "file").write_text("not a directory")  # even root can not make a directory under a file
    out = run_script(tmp_path, str(tmp_path / "file" / "cache"))
    assert out["cache_dir"] is None and out["events"][-1]["done"]
    assert out["stderr"].count("can not be written") == 1, out["stderr"]


def test_the_default_directory_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_cache_dir() == str(tmp_path / "xdg" / "eagle3-jax" / "jax-compile")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_cache_dir() == str(tmp_path / "home" / ".cache" / "eagle3-jax" / "jax-compile")
    monkeypatch.setenv(compile_cache.ENV, "~/elsewhere")
    assert compile_cache.default_cache_dir() == str(tmp_path / "home" / "elsewhere")
    for value in ("off", "OFF", "0", "none", "false", "no"):
        monkeypatch.setenv(compile_cache.ENV, value)
        assert compile_cache.default_cache_dir() is None


def test_enable_warns_about_an_unwritable_directory_only_once(tmp_path):
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "cache"
    before = compile_cache.cache_dir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compile_cache.enable(bad) == before  # the cache in use (if any) is kept
        assert compile_cache.enable(bad) == before
    assert len([w for w in caught if "can not be written" in str(w.message)]) == 1


MESSAGE = re.compile(r"compiling the prefill \(batch 1, prompt bucket 16, cache \d+\)\.\.\. "
                     r"(done|loaded from the compilation cache) in \d+\.\d s\n")


@pytest.mark.slow
def test_the_cli_says_when_it_compiles(capsys, hf_qwen3):
    from eagle3_jax.cli import main
    from eagle3_jax.compiled import CompiledFunction

    argv = ["generate", "--target", hf_qwen3.path, "--prompt-ids", "7,8,9", "--max-new-tokens", "3", "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    [json.loads(line) for line in out.splitlines()]  # stdout stays JSON lines
    assert MESSAGE.search(err), err
    assert "compiling the decode loop (batch 1, cache" in err
    if compile_cache.cache_dir():  # the session's cache (tests/conftest.py) is on
        CompiledFunction.clear_all()
        assert main(argv) == 0
        out, err = capsys.readouterr()
        [json.loads(line) for line in out.splitlines()]
        assert "compiling the prefill (batch 1, prompt bucket 16" in err
        assert "loaded from the compilation cache in" in err, err


@pytest.mark.slow
def test_the_cli_flag_turns_the_cache_off(tmp_path, hf_qwen3):
    cache = tmp_path / "cache"
    env = dict(os.environ, EAGLE3_JAX_COMPILE_CACHE=str(cache), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "eagle3_jax.cli", "generate", "--target", hf_qwen3.path,
                           "--prompt-ids", "7,8,9", "--max-new-tokens", "3", "--json", "--no-compile-cache"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    [json.loads(line) for line in done.stdout.splitlines()]
    assert MESSAGE.search(done.stderr) and "loaded from" not in done.stderr, done.stderr
    assert not cache.exists()


@pytest.mark.slow
def test_programs_written_without_a_size_bound_do_not_break_the_cache(tmp_path):
    """JAX's size-bounded cache fails every write when a program lacks its access-time file (one written by a
    process with JAX's default, unbounded cache); enabling the cache gives them one."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "jit_foreign-0123456789abcdef-cache").write_bytes(b"a program written without a size bound")
    first = run_script(tmp_path, str(cache))
    assert "Error writing persistent compilation cache entry" not in first["stderr"], first["stderr"]
    assert len(entries(cache)) > 1  # our program was written beside the foreign one
    assert (cache / "jit_foreign-0123456789abcdef-atime").is_file()
    second = run_script(tmp_path, str(cache))
    assert second["events"][-1]["from_cache"] is True
