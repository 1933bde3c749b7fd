"""Bad input at the command line, as an adversarial user would try it (mutations of the embedded demo pair).

Every case must end with exit status 1 (bad input) or 2 (bad command line),
exactly one ``error:`` line on stderr, no traceback, and nothing left behind
in the directories it was given.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import rewrite_safetensors

from eagle3_jax.cli import main
from eagle3_jax.demo import demo_paths
from eagle3_jax.weights.safetensors_io import SafetensorsFile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_model(src: str, dst: str) -> str:
    """A copy of a model directory whose weights are a symlink (cheap; mutate by replacing files)."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
        else:
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return dst


def _edit_json(path, **changes):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


_DELETE = object()


def _write(path, data: bytes):
    if os.path.islink(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.write(data)


def _rewrite_weights(model_dir, change):
    """Rewrites model.safetensors with ``change(dict of arrays)`` applied."""
    rewrite_safetensors(os.path.join(model_dir, "model.safetensors"), change)


def _poison(tensors):
    name = next(n for n in sorted(tensors) if n.endswith("mlp.down_proj.weight"))
    t = tensors[name].astype(np.float32)
    t[0, 0] = np.nan
    tensors[name] = t.astype(tensors[name].dtype)


def _poison_any(tensors):
    name = next(n for n in sorted(tensors) if tensors[n].dtype.kind == "f" or "bfloat16" in str(tensors[n].dtype))
    t = tensors[name].astype(np.float32)
    t.flat[0] = np.inf
    tensors[name] = t.astype(tensors[name].dtype)


def _overlap(path):
    """Two tensors claim the same bytes (the reference implementation refuses such files)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = names[0], names[1]
    if header[a]["dtype"] == header[b]["dtype"] and header[a]["shape"] == header[b]["shape"]:
        header[b]["data_offsets"] = header[a]["data_offsets"]
    else:
        header[a]["data_offsets"] = [header[a]["data_offsets"][0] + 2, header[a]["data_offsets"][1] + 2]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    _write(path, struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    target, head = demo_paths("toy")
    return target, head


class Case:
    def __init__(self, name, build, codes=(1,), match=None):
        self.name, self.build, self.codes, self.match = name, build, codes, match

    def __repr__(self):
        return self.name


def gen(*extra, prompt=("--prompt-ids", "5,6,7")):
    return ["generate", "--target", "{t}", *prompt, "--max-new-tokens", "4", "--json", *extra]


def target_config(**changes):
    return lambda t, h, w: _edit_json(os.path.join(t, "config.json"), **changes)


def head_config(**changes):
    return lambda t, h, w: _edit_json(os.path.join(h, "config.json"), **changes)


def raw_file(name, data, which="t"):
    return lambda t, h, w: _write(os.path.join(t if which == "t" else h, name), data)


def index(weight_map):
    def build(t, h, w):
        os.unlink(os.path.join(t, "model.safetensors"))
        shutil.copy(os.path.join(demo_paths("toy")[0], "model.safetensors"), os.path.join(t, "shard.safetensors"))
        keys = SafetensorsFile(os.path.join(t, "shard.safetensors")).keys()
        with open(os.path.join(t, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": weight_map(keys)}, f)
    return build


def fifo(t, h, w):
    os.unlink(os.path.join(t, "model.safetensors"))
    os.mkfifo(os.path.join(t, "model.safetensors"))


def chat_template_raises(t, h, w):
    _edit_json(os.path.join(t, "tokenizer_config.json"), chat_template="{{ raise_exception('no chat for you') }}")


def user_dir(w):
    os.makedirs(os.path.join(w, "mine"))
    with open(os.path.join(w, "mine", "notes.txt"), "w") as f:
        f.write("precious")
    return os.path.join(w, "mine")


def nothing(t, h, w):
    pass


CASES = [
    # configs parsed by the project first, whatever the command
    Case("config empty", raw_file("config.json", b""), match="config.json"),
    Case("config not json", raw_file("config.json", b"{model_type: qwen3"), match="config.json"),
    Case("config array", raw_file("config.json", b"[1, 2]"), match="config.json"),
    Case("config not utf8", raw_file("config.json", b'{"model_type": "qwen3\xff\xfe"}'), match="config.json"),
    Case("layers negative", target_config(num_hidden_layers=-2), match="num_hidden_layers"),
    Case("layers huge", target_config(num_hidden_layers=1000000), match="num_hidden_layers"),
    Case("zero heads", target_config(num_attention_heads=0), match="num_attention_heads"),
    Case("rope_theta text", target_config(rope_theta="abc"), match="rope_theta"),
    Case("rope_theta nan", target_config(rope_theta=math.nan), match="rope_theta"),
    Case("rope_scaling string", target_config(rope_scaling="linear"), match="rope_scaling"),
    Case("hidden_size string", target_config(hidden_size="256"), match="hidden_size"),
    Case("tie string", target_config(tie_word_embeddings="no"), match="tie_word_embeddings"),
    Case("eos mixed", target_config(eos_token_id=[0, "2"]), match="eos_token_id"),
    Case("eos outside vocab", target_config(eos_token_id=99999), match="eos_token_id 99999 is outside"),
    Case("chat without prompt", nothing, codes=(2,), match="--chat needs --prompt"),
    Case("model_type missing", target_config(model_type=_DELETE), match="model_type"),
    Case("generation_config broken", raw_file("generation_config.json", b"{"), match="generation_config.json"),
    Case("head eagle_config list", head_config(eagle_config=[1]), match="eagle_config"),
    Case("head vocab mismatch", head_config(vocab_size=4097, draft_vocab_size=4097), match="vocab_size"),
    Case("head hidden string", head_config(hidden_size="256"), match="hidden_size"),
    # tokenizers and text
    Case("tokenizer broken, text prompt", raw_file("tokenizer.json", b"{\"version\": "),
         match="tokenizer"),
    Case("prompt not utf8", nothing, match="UTF-8"),
    Case("chat template raises", chat_template_raises, match="chat template"),
    # weights
    Case("weights fifo", fifo, match="model.safetensors"),
    Case("weights not safetensors", raw_file("model.safetensors", b"\x00" * 64), match="model.safetensors"),
    Case("weights truncated", lambda t, h, w: _write(os.path.join(t, "model.safetensors"), open(
        os.path.join(demo_paths("toy")[0], "model.safetensors"), "rb").read()[:100000]),
         match="truncated|model.safetensors"),
    Case("weights overlapping offsets", lambda t, h, w: _overlap(os.path.join(t, "model.safetensors")),
         match="model.safetensors"),
    Case("weights nan", lambda t, h, w: _rewrite_weights(t, _poison), match="down_proj"),
    Case("weights nan, loaded anyway", lambda t, h, w: _rewrite_weights(t, _poison), match="non-finite logits"),
    Case("head weights nan", lambda t, h, w: _rewrite_weights(h, _poison_any), match="non-finite"),
    Case("index escapes dir", index(lambda keys: {k: "../../../../etc/passwd" for k in keys}), match="index"),
    Case("index absolute path", index(lambda keys: {k: "/etc/passwd" for k in keys}), match="index"),
    Case("index wrong types", index(lambda keys: {k: 7 for k in keys}), match="index"),
    # numbers out of range
    Case("num-steps huge", nothing, match="num_steps"),
    Case("tree huge", nothing, match="topk|num_draft_tokens|num_steps"),
    Case("max-cache-len past context", nothing, match="max_cache_len"),
    Case("memory", target_config(max_position_embeddings=2**24), match="needs at least"),
    Case("seed float", nothing, codes=(2,), match="seed"),
    Case("seed huge", nothing, codes=(2,), match="seed"),
    Case("temperature nan", nothing, codes=(2,), match="finite"),
    Case("top-p 2", nothing, match="top_p"),
    Case("top-k negative", nothing, codes=(2,), match="non-negative"),
    Case("prompt id outside vocab", nothing, match="outside the vocabulary"),
    Case("stop id negative", nothing, match="outside the vocabulary"),
    Case("unknown option", nothing, codes=(2,), match="unrecognized arguments"),
    Case("target missing", nothing, match="no such directory"),
    Case("target is a file", nothing, match="expected a model directory"),
    # outputs
    Case("convert over a user dir", nothing, match="not an output of eagle3-jax"),
    Case("convert into a file's child", nothing, match="can not write"),
    Case("eval output is a file", nothing, match="not an output of eagle3-jax|already exists"),
    Case("eval output user dir", nothing, match="already exists|not an output"),
    Case("regenerate output exists", nothing, match="already exists"),
    Case("regenerate data not utf8", lambda t, h, w: _write(os.path.join(w, "c.jsonl"), b'{"text": "\xff"}\n'),
         match="c.jsonl:1: not UTF-8"),
    Case("regenerate data nested", lambda t, h, w: _write(os.path.join(w, "c.jsonl"), b"[" * 100000 + b"\n"),
         match="c.jsonl:1: not valid JSON"),
    Case("regenerate data fifo", lambda t, h, w: (os.unlink(os.path.join(w, "c.jsonl")),
                                                   os.mkfifo(os.path.join(w, "c.jsonl"))), match="not a regular file"),
    Case("eval bench empty turn", lambda t, h, w: _write(os.path.join(w, "b.jsonl"), b'{"turns": [" "]}\n'),
         match="b.jsonl:1: a turn is empty"),
    Case("eval bench-dir missing", nothing, match="--bench-dir is not a directory"),
    Case("eval bench NaN", lambda t, h, w: _write(os.path.join(w, "b.jsonl"), b'{"turns": ["x"], "id": NaN}\n'),
         match="b.jsonl:1: not valid JSON"),
    Case("train output is a file", nothing, match="file|directory"),
    Case("train lr nan", nothing, codes=(2,), match="finite"),
    Case("train ttt huge", nothing, match="ttt_length must be at most"),
    Case("train devices 99", nothing, match="devices"),
    Case("regenerate output is its data", nothing, match="is also --data"),
    Case("train resume not a run", nothing, match="nothing to resume"),
]

ARGV = {
    "chat without prompt": gen("--chat"),
    "weights nan, loaded anyway": gen("--no-check-finite"),
    "head weights nan": gen("--draft", "{h}"),
    "head eagle_config list": gen("--draft", "{h}"),
    "head vocab mismatch": gen("--draft", "{h}"),
    "head hidden string": gen("--draft", "{h}"),
    "tokenizer broken, text prompt": gen(prompt=("--prompt", "def f():")),
    "prompt not utf8": gen(prompt=("--prompt", "def f(\udcff):")),
    "chat template raises": gen("--chat", prompt=("--prompt", "hello")),
    "num-steps huge": gen("--draft", "{h}", "--num-steps", "1000"),
    "tree huge": gen("--draft", "{h}", "--num-steps", "20", "--tree-topk", "64", "--num-draft-tokens", "2000"),
    "max-cache-len past context": gen("--max-cache-len", "1000000000"),
    "memory": ["generate", "--target", "{t}", *sum((["--prompt-ids", "5,6,7"] for _ in range(8)), []),
               "--max-cache-len", str(2**24), "--json"],
    "seed float": gen("--seed", "1e21"),
    "seed huge": gen("--seed", str(2**40)),
    "temperature nan": gen("--temperature", "nan"),
    "top-p 2": gen("--top-p", "2", "--temperature", "1"),
    "top-k negative": gen("--top-k", "-1"),
    "prompt id outside vocab": gen(prompt=("--prompt-ids", "5,4096")),
    "stop id negative": gen("--stop-ids", "-1"),
    "unknown option": gen("--frobnicate"),
    "target missing": ["generate", "--target", "{w}/nope", "--prompt-ids", "5"],
    "target is a file": ["generate", "--target", "{t}/config.json", "--prompt-ids", "5"],
    "convert over a user dir": ["convert", "{t}", "{mine}", "--overwrite", "--json"],
    "convert into a file's child": ["convert", "{t}", "{t}/config.json/out", "--json"],
    "eval output is a file": ["eval", "--target", "{t}", "--draft", "{h}", "--bench-file", "x={w}/b.jsonl",
                              "--bench", "x", "--output", "{t}/config.json", "--json"],
    "eval output user dir": ["eval", "--target", "{t}", "--draft", "{h}", "--bench-file", "x={w}/b.jsonl",
                             "--bench", "x", "--output", "{mine}", "--json"],
    "regenerate output exists": ["regenerate", "--target", "{t}", "--data", "{w}/c.jsonl", "--output",
                                 "{mine}/notes.txt"],
    "regenerate data not utf8": ["regenerate", "--target", "{t}", "--data", "{w}/c.jsonl", "--output", "{w}/o.jsonl"],
    "regenerate data nested": ["regenerate", "--target", "{t}", "--data", "{w}/c.jsonl", "--output", "{w}/o.jsonl"],
    "regenerate data fifo": ["regenerate", "--target", "{t}", "--data", "{w}/c.jsonl", "--output", "{w}/o.jsonl"],
    "eval bench empty turn": ["eval", "--target", "{t}", "--draft", "{h}", "--bench-file", "x={w}/b.jsonl",
                              "--output", "{w}/report", "--json"],
    "eval bench-dir missing": ["eval", "--target", "{t}", "--draft", "{h}", "--bench-dir", "{w}/nope",
                               "--output", "{w}/report", "--json"],
    "eval bench NaN": ["eval", "--target", "{t}", "--draft", "{h}", "--bench-file", "x={w}/b.jsonl",
                       "--bench", "x", "--output", "{w}/report", "--json"],
    "train output is a file": ["train", "--target", "{t}", "--data", "{w}/c.jsonl", "--output", "{mine}/notes.txt",
                               "--json"],
    "train devices 99": ["train", "--target", "{t}", "--data", "{w}/c.jsonl", "--output", "{w}/run", "--devices",
                         "99"],
    "regenerate output is its data": ["regenerate", "--target", "{t}", "--data", "{w}/c.jsonl", "--output",
                                      "{w}/c.jsonl", "--overwrite"],
    "train ttt huge": ["train", "--target", "{t}", "--data", "{w}/c.jsonl", "--output", "{w}/run", "--ttt-length",
                       "1000"],
    "train resume not a run": ["train", "--target", "{t}", "--data", "{w}/c.jsonl", "--output", "{mine}", "--resume"],
    "train lr nan": ["train", "--target", "{t}", "--data", "{w}/c.jsonl", "--output", "{w}/run", "--lr", "nan"],
}


def _snapshot(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = None if os.path.isdir(path) else os.lstat(path).st_size
    return out


SLOW_CASES = {"weights nan, loaded anyway"}  # compiles and runs a decode: only in the full run, not in -m "not slow"


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.name in SLOW_CASES else c
                                  for c in CASES], ids=lambda c: c.name)
def test_bad_input(case, demo_pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = _copy_model(demo_pair[0], str(tmp_path / "target"))
    h = _copy_model(demo_pair[1], str(tmp_path / "head"))
    w = str(tmp_path)
    mine = user_dir(w)
    with open(os.path.join(w, "b.jsonl"), "w") as f:
        f.write(json.dumps({"id": "1", "turns": ["def f():"]}) + "\n")
    with open(os.path.join(w, "c.jsonl"), "w") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "hello"}]}) + "\n")
    case.build(t, h, w)
    argv = [a.format(t=t, h=h, w=w, mine=mine) for a in ARGV.get(case.name, gen())]
    before = _snapshot(w)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert code in case.codes, f"exit {code}, stderr:\n{err}"
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    if case.match:
        import re

        assert re.search(case.match, errors[0]), errors[0]
    assert _snapshot(w) == before, "the command left something behind or changed the user's files"
    assert open(os.path.join(mine, "notes.txt")).read() == "precious"


@pytest.mark.slow
def test_broken_tokenizer_is_not_needed_for_token_ids(demo_pair, tmp_path, capsys):
    t = _copy_model(demo_pair[0], str(tmp_path / "target"))
    _write(os.path.join(t, "tokenizer.json"), b"{\"version\": ")
    code = main(["generate", "--target", t, "--prompt-ids", "5,6,7", "--max-new-tokens", "3", "--json", "--no-stop"])
    out, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads(out.splitlines()[0])
    assert row["text"] is None and len(row["token_ids"]) == 3
    assert "warning:" in err and "tokenizer" in err and "Traceback" not in err


def test_entry_point_prints_one_error_line(demo_pair, tmp_path):
    """The installed entry point, in its own process: one line, no traceback, exit 1."""
    t = _copy_model(demo_pair[0], str(tmp_path / "target"))
    _edit_json(os.path.join(t, "config.json"), rope_scaling="linear")
    done = subprocess.run([sys.executable, "-m", "eagle3_jax.cli", "generate", "--target", t, "--prompt", "x"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        line for line in done.stderr.splitlines() if line.startswith("error:")] and "rope_scaling" in done.stderr
