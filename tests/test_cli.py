"""The eagle3-jax command line: JSON contract, errors and exit codes."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from eagle3_jax import Generator, load_target
from eagle3_jax.cli import main

JSON_KEYS = {"token_ids", "text", "finish_reason", "num_target_forwards", "tokens_per_second"}


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prompt_ids_json(capsys, hf_qwen3):
    code, out, _ = run_cli(capsys, "generate", "--target", hf_qwen3.path, "--prompt-ids", "7,8,9",
                           "--prompt-ids", "10, 11", "--max-new-tokens", "6", "--no-stop", "--json",
                           "--dtype", "float32")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and all(JSON_KEYS <= set(r) for r in rows)
    expected = Generator(load_target(hf_qwen3.path, dtype="float32", progress=False)).generate(
        [[7, 8, 9], [10, 11]], max_new_tokens=6, stop_token_ids=())
    for r, e in zip(rows, expected):
        assert r["token_ids"] == e.token_ids and r["text"] is None
        assert r["finish_reason"] == "length" and r["num_target_forwards"] == 5
        assert r["tokens_per_second"] > 0


def test_generate_text_with_chat_template(capsys, hf_qwen3_real_vocab):
    from transformers import AutoTokenizer

    code, out, _ = run_cli(capsys, "generate", "--target", hf_qwen3_real_vocab.path, "--prompt", "Hello there",
                           "--chat", "--max-new-tokens", "5", "--json")
    assert code == 0
    row = json.loads(out)
    tok = AutoTokenizer.from_pretrained(hf_qwen3_real_vocab.path)
    assert isinstance(row["text"], str)
    assert row["text"] == tok.decode(row["token_ids"], skip_special_tokens=True)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.startswith("<|im_start|>user\nHello there") and chat.endswith("<|im_start|>assistant\n")
    assert row["prompt_length"] == len(tok(chat, add_special_tokens=False)["input_ids"])
    assert 1 <= len(row["token_ids"]) <= 5


def test_plain_text_output(capsys, hf_qwen3):
    code, out, err = run_cli(capsys, "generate", "--target", hf_qwen3.path, "--prompt-ids", "7,8",
                             "--max-new-tokens", "3", "--no-stop")
    assert code == 0
    assert len(out.strip().split(",")) == 3 and "tok/s" in err


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "hi"], "has no tokenizer files; pass --prompt-ids"),
    (["--prompt-ids", "7,8", "--max-cache-len", "2"], "does not fit in a KV cache of 2 slots"),
    (["--prompt-ids", "7,8", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt-ids", "7,999"], "outside the vocabulary"),
])
def test_user_errors_exit_1_with_a_message(capsys, hf_qwen3, argv, message):
    code, out, err = run_cli(capsys, "generate", "--target", hf_qwen3.path, *argv)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["generate", "--target", "x", "--prompt-ids", "1,a"],
    ["generate", "--target", "x", "--prompt-ids", "1", "--bogus"],
    ["generate", "--target", "x"],
    ["generate", "--target", "x", "--prompt", "a", "--prompt-ids", "1"],
    ["generate", "--target", "x", "--prompt-ids", "1", "--chat"],
    ["generate", "--target", "x", "--prompt-ids", "1", "--dtype", "int8"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--target", "--prompt", "--prompt-ids", "--max-new-tokens", "--temperature", "--top-p", "--top-k",
                "--seed", "--max-cache-len", "--dtype", "--json", "--chat"):
        assert opt in text


def test_convert_cli(capsys, hf_qwen3, tmp_path):
    dst = tmp_path / "conv"
    code, out, _ = run_cli(capsys, "convert", hf_qwen3.path, str(dst), "--json")
    assert code == 0 and json.loads(out)["output"] == str(dst)
    code, _, err = run_cli(capsys, "convert", hf_qwen3.path, str(dst))
    assert code == 1 and "already exists" in err
    code, out, _ = run_cli(capsys, "generate", "--target", str(dst), "--prompt-ids", "7,8", "--json",
                           "--max-new-tokens", "2")
    assert code == 0 and len(json.loads(out)["token_ids"]) <= 2


def test_console_script_and_convert_script(hf_qwen3, tmp_path):
    exe = shutil.which("eagle3-jax", path=os.path.dirname(sys.executable)) or shutil.which("eagle3-jax")
    assert exe, "the eagle3-jax console script is not installed"
    done = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("eagle3-jax ")
    script = os.path.join(os.path.dirname(__file__), "..", "convert", "convert_checkpoint.py")
    done = subprocess.run([sys.executable, script, hf_qwen3.path, str(tmp_path / "c"), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.path.exists(tmp_path / "c" / "params")
    done = subprocess.run([sys.executable, script, str(tmp_path / "missing"), str(tmp_path / "d")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "error:" in done.stderr and "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "d")


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory):
    from eagle3_reference import make_reference_head

    path = tmp_path_factory.mktemp("cli_head")
    make_reference_head(path, seed=7, draft_vocab=50)
    return str(path)


def test_speculative_generate_json(capsys, hf_qwen3, head_dir):
    base = ["generate", "--target", hf_qwen3.path, "--prompt-ids", "7,8,9", "--prompt-ids", "20,21,22,23,24",
            "--max-new-tokens", "12", "--no-stop", "--json"]
    code, out, _ = run_cli(capsys, *base)
    plain_rows = [json.loads(line) for line in out.splitlines()]
    code, out, _ = run_cli(capsys, *base, "--draft", head_dir, "--num-steps", "3", "--topk", "2",
                           "--num-draft-tokens", "5")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    for p, r in zip(plain_rows, rows):
        assert r["token_ids"] == p["token_ids"]
        assert p["acceptance_length"] == 1.0 and p["accept_lengths"] == [1] * 11
        assert sum(r["accept_lengths"]) == 11 and len(r["accept_lengths"]) == r["num_target_forwards"]
        assert r["acceptance_length"] == pytest.approx(11 / r["num_target_forwards"])


def test_streamed_text_equals_the_final_text(capsys, hf_qwen3_real_vocab):
    argv = ["generate", "--target", hf_qwen3_real_vocab.path, "--prompt", "Streaming test", "--max-new-tokens", "9",
            "--no-stop"]
    code, streamed, _ = run_cli(capsys, *argv, "--stream")
    assert code == 0
    code, whole, _ = run_cli(capsys, *argv, "--no-stream")
    assert streamed == whole and len(whole.strip()) > 0


@pytest.mark.parametrize("argv, message", [
    (["--draft", "HEAD", "--num-steps", "3", "--topk", "1", "--num-draft-tokens", "7"],
     "num_draft_tokens must be num_steps + 1 = 4"),
    (["--draft", "HEAD", "--feature-layers", "2,3,9"], "feature layers [9] are outside the target's 4 layers"),
    (["--draft", "NOPE"], "no such directory"),
])
def test_speculative_user_errors(capsys, hf_qwen3, head_dir, tmp_path, argv, message):
    argv = [a.replace("HEAD", head_dir).replace("NOPE", str(tmp_path / "nope")) for a in argv]
    code, out, err = run_cli(capsys, "generate", "--target", hf_qwen3.path, "--prompt-ids", "7,8", *argv)
    assert code == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["--num-steps", "3"],
    ["--draft", "HEAD", "--topk", "2"],
    ["--draft", "HEAD", "--json", "--stream"],
])
def test_speculative_usage_errors(capsys, hf_qwen3, head_dir, argv):
    argv = [a.replace("HEAD", head_dir) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(["generate", "--target", hf_qwen3.path, "--prompt-ids", "7,8", *argv])
    assert e.value.code == 2
