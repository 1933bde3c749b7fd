"""The eagle3-jax command line: JSON contract, errors and exit codes."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from eagle3_jax import Generator, load_target
from eagle3_jax.cli import main

JSON_KEYS = {"token_ids", "text", "reasoning", "answer", "finish_reason", "num_target_forwards",
             "tokens_per_second"}
BATCH_KEYS = {"prompts", "generated_tokens", "prefill_seconds", "decode_seconds", "compile_seconds",
              "tokens_per_second"}


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def json_rows(out: str) -> list[dict]:
    """The per-prompt rows of ``generate --json``; checks the final batch line, which holds the batch's timings."""
    lines = [json.loads(line) for line in out.splitlines()]
    *rows, batch = lines
    assert set(batch) == {"batch"} and set(batch["batch"]) == BATCH_KEYS, batch
    assert batch["batch"]["prompts"] == len(rows)
    assert batch["batch"]["generated_tokens"] == sum(len(r["token_ids"]) for r in rows)
    for r in rows:  # the batch's timings are not repeated on every row
        assert not {"prefill_seconds", "decode_seconds", "compile_seconds"} & set(r)
    return rows


def test_generate_prompt_ids_json(capsys, hf_qwen3):
    code, out, _ = run_cli(capsys, "generate", "--target", hf_qwen3.path, "--prompt-ids", "7,8,9",
                           "--prompt-ids", "10, 11", "--max-new-tokens", "6", "--no-stop", "--json",
                           "--dtype", "float32")
    assert code == 0
    rows = json_rows(out)
    assert len(rows) == 2 and all(JSON_KEYS <= set(r) for r in rows)
    expected = Generator(load_target(hf_qwen3.path, dtype="float32", progress=False)).generate(
        [[7, 8, 9], [10, 11]], max_new_tokens=6, stop_token_ids=())
    for r, e in zip(rows, expected):
        assert r["token_ids"] == e.token_ids and r["text"] is None and r["reasoning"] is None
        assert r["finish_reason"] == "length" and r["num_target_forwards"] == 5
        assert r["tokens_per_second"] > 0


@pytest.mark.slow
def test_generate_text_with_chat_template(capsys, hf_qwen3_real_vocab):
    from transformers import AutoTokenizer

    code, out, _ = run_cli(capsys, "generate", "--target", hf_qwen3_real_vocab.path, "--prompt", "Hello there",
                           "--chat", "--max-new-tokens", "5", "--json")
    assert code == 0
    [row] = json_rows(out)
    tok = AutoTokenizer.from_pretrained(hf_qwen3_real_vocab.path)
    assert isinstance(row["text"], str)
    assert row["text"] == tok.decode(row["token_ids"], skip_special_tokens=True)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.startswith("<|im_start|>user\nHello there") and chat.endswith("<|im_start|>assistant\n")
    assert row["prompt_length"] == len(tok(chat, add_special_tokens=False)["input_ids"])
    assert 1 <= len(row["token_ids"]) <= 5


@pytest.mark.slow
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
                "--seed", "--max-cache-len", "--dtype", "--json", "--chat", "--stop"):
        assert opt in text
    flat = " ".join(text.split())
    for key in ("prompt_index", "reasoning", "answer", '{"batch": {...}}', "prefill_seconds", "compile_seconds"):
        assert key in flat, key


@pytest.mark.slow
def test_convert_cli(capsys, hf_qwen3, tmp_path):
    dst = tmp_path / "conv"
    code, out, _ = run_cli(capsys, "convert", hf_qwen3.path, str(dst), "--json")
    assert code == 0 and json.loads(out)["output"] == str(dst)
    code, _, err = run_cli(capsys, "convert", hf_qwen3.path, str(dst))
    assert code == 1 and "already exists" in err
    code, out, _ = run_cli(capsys, "generate", "--target", str(dst), "--prompt-ids", "7,8", "--json",
                           "--max-new-tokens", "2")
    assert code == 0 and len(json_rows(out)[0]["token_ids"]) <= 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_speculative_generate_json(capsys, hf_qwen3, head_dir):
    base = ["generate", "--target", hf_qwen3.path, "--prompt-ids", "7,8,9", "--prompt-ids", "20,21,22,23,24",
            "--max-new-tokens", "12", "--no-stop", "--json"]
    code, out, _ = run_cli(capsys, *base)
    plain_rows = json_rows(out)
    code, out, _ = run_cli(capsys, *base, "--draft", head_dir, "--num-steps", "3", "--tree-topk", "2",
                           "--num-draft-tokens", "5")
    assert code == 0
    rows = json_rows(out)
    for p, r in zip(plain_rows, rows):
        assert r["token_ids"] == p["token_ids"]
        assert p["acceptance_length"] == 1.0 and p["accept_lengths"] == [1] * 11
        assert sum(r["accept_lengths"]) == 11 and len(r["accept_lengths"]) == r["num_target_forwards"]
        assert r["acceptance_length"] == pytest.approx(11 / r["num_target_forwards"])


@pytest.mark.slow
def test_streamed_text_equals_the_final_text(capsys, hf_qwen3_real_vocab):
    argv = ["generate", "--target", hf_qwen3_real_vocab.path, "--prompt", "Streaming test", "--max-new-tokens", "9",
            "--no-stop"]
    code, streamed, _ = run_cli(capsys, *argv, "--stream")
    assert code == 0
    code, whole, _ = run_cli(capsys, *argv, "--no-stream")
    assert streamed == whole and len(whole.strip()) > 0


@pytest.mark.parametrize("argv, message", [
    (["--draft", "HEAD", "--num-steps", "3", "--tree-topk", "1", "--num-draft-tokens", "7"],
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
    ["--draft", "HEAD", "--tree-topk", "2"],
    ["--draft", "HEAD", "--json", "--stream"],
])
def test_speculative_usage_errors(capsys, hf_qwen3, head_dir, argv):
    argv = [a.replace("HEAD", head_dir) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(["generate", "--target", hf_qwen3.path, "--prompt-ids", "7,8", *argv])
    assert e.value.code == 2


@pytest.mark.slow
def test_generate_stop_strings(capsys, hf_qwen3_real_vocab):
    base = ["generate", "--target", hf_qwen3_real_vocab.path, "--prompt", "Stop here", "--prompt", "And here",
            "--max-new-tokens", "8", "--no-stop", "--json"]
    code, out, _ = run_cli(capsys, *base)
    free = json_rows(out)
    text = free[0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    code, out, _ = run_cli(capsys, *base, "--stop", stop, "--stop", "\u2603 never")
    assert code == 0
    rows = json_rows(out)
    assert rows[0]["finish_reason"] == "stop" and rows[0]["text"] == text[: text.index(stop)]
    assert rows[0]["token_ids"] == free[0]["token_ids"][: len(rows[0]["token_ids"])]
    if stop not in free[1]["text"]:
        assert rows[1]["token_ids"] == free[1]["token_ids"]
    code, streamed, _ = run_cli(capsys, *base[:5], *base[7:-1], "--stop", stop, "--stream")
    assert code == 0 and streamed == rows[0]["text"] + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", "7,8", "--stop", "x"], "--stop needs the target's tokenizer"),
    (["--prompt-ids", "7,8", "--stop", ""], "stop strings must not be empty"),
])
def test_stop_user_errors(capsys, hf_qwen3, argv, message):
    code, out, err = run_cli(capsys, "generate", "--target", hf_qwen3.path, *argv)
    assert code == 1 and out == "" and message in err


class _Pieces:
    """A tokenizer whose token i decodes to pieces[i]."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


@pytest.mark.parametrize("opened", [False, True])
def test_streamed_reply_shows_reasoning_and_answer_apart(capsys, opened):
    """Streaming prints, piece by piece, what the whole reply prints: thinking tags as headings, cut at a stop."""
    from eagle3_jax.cli.generate import StreamPrinter, shown

    pieces = (["<think>", "\n"] if not opened else []) + ["Two", " and", " two", ".\n", "</", "think", ">\n", "\n",
                                                         "Four", ".\n", "\n", "Obs", "erv", "ation:", " x"]
    tok = _Pieces(pieces)
    printer = StreamPrinter(tok, 1, ("\n\nObservation:",), opened)
    for i in range(len(pieces)):
        printer(0, [i])
    final = "".join(pieces).split("\n\nObservation:")[0]  # GenerationOutput.text
    printer.finish(final)
    out = capsys.readouterr().out
    assert out == shown(final, opened) + "\n"
    assert out == "[reasoning]\nTwo and two.\n\n[answer]\nFour.\n"


def test_compile_messages_wait_for_the_end_of_a_streamed_reply(capsys):
    """A program compiled while a reply streams (the loop, after the first tokens) is announced after the reply's
    line, never inside it."""
    from eagle3_jax.cli.generate import StreamPrinter
    from eagle3_jax.cli.options import COMPILE_MESSAGES
    from eagle3_jax.compiled import CompileEvent

    COMPILE_MESSAGES(CompileEvent("the prefill", done=False))  # before any text: printed at once
    COMPILE_MESSAGES(CompileEvent("the prefill", done=True, seconds=1.0))
    assert "compiling the prefill... done in 1.0 s" in capsys.readouterr().err
    printer = StreamPrinter(None, rows=1)
    printer(0, [5, 6])
    COMPILE_MESSAGES(CompileEvent("the decode loop", done=False))
    COMPILE_MESSAGES(CompileEvent("the decode loop", done=True, seconds=2.0))
    printer(0, [7])
    captured = capsys.readouterr()
    assert captured.out == "5,6,7" and captured.err == ""
    printer.finish(None)
    captured = capsys.readouterr()
    assert captured.out == "\n" and "compiling the decode loop... done in 2.0 s" in captured.err
    COMPILE_MESSAGES(CompileEvent("x", done=True, seconds=0.5))  # released: printed at once again
    assert "x: done in 0.5 s" in capsys.readouterr().err


def test_batch_text_output_keeps_the_prompts_apart(capsys):
    from eagle3_jax.cli.generate import StreamPrinter, print_text
    from eagle3_jax.generation import GenerationOutput

    def out(text):
        return GenerationOutput(token_ids=[1, 2], finish_reason="length", num_target_forwards=1, accept_lengths=[1],
                                acceptance_length=1.0, prompt_length=3, prefill_seconds=0.1, decode_seconds=0.1,
                                compile_seconds=0.0, tokens_per_second=10.0, text=text)

    print_text([out("one\nline two"), out("three")], None, [False, False], speculative=False)
    assert capsys.readouterr().out == "[prompt 0]\none\nline two\n[prompt 1]\nthree\n"
    print_text([out("alone")], None, [False], speculative=False)
    assert capsys.readouterr().out == "alone\n"  # one prompt: no heading
    printer = StreamPrinter(None, rows=2)  # a streamed batch: row 0 opens with its heading as it streams
    printer(0, [4, 5])
    print_text([out(None), out("three")], printer, [False, False], speculative=False)
    assert capsys.readouterr().out == "[prompt 0]\n4,5\n[prompt 1]\nthree\n"
