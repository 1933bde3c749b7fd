"""Several processes, one mesh (docs/architecture.md#multi-host): two processes on 127.0.0.1, one CPU
device each, joined by ``--distributed`` (jax.distributed over gloo), give the tokens and the training
losses of one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from eagle3_jax.cli import main
from eagle3_jax.demo import demo_paths

TARGET, HEAD = demo_paths("toy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(argv: list[str], cwd: str) -> list[subprocess.CompletedProcess]:
    """Runs ``eagle3-jax argv --distributed ...`` as processes 0 and 1 of one job; both must succeed."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    env["JAX_PLATFORMS"] = "cpu"
    procs = [subprocess.Popen([sys.executable, "-m", "eagle3_jax", *argv, "--distributed", "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
             for i in range(2)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    for i, d in enumerate(done):
        assert d.returncode == 0, f"process {i}: {d.stderr[-3000:]}"
    return done


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_two_processes_generate_the_tokens_of_one(tmp_path, capsys):
    argv = ["generate", "--target", TARGET, "--draft", HEAD, "--num-steps", "3", "--tree-topk", "4",
            "--num-draft-tokens", "8", "--prompt-ids", "5,6,7,8", "--prompt-ids", "9,10,11", "--max-new-tokens",
            "16", "--no-stop", "--json", "--dtype", "float32"]
    assert main(argv) == 0
    alone = [(r["token_ids"], r["accept_lengths"]) for r in _json_lines(capsys.readouterr().out) if "token_ids" in r]
    # the target tensor-parallel over the two processes' devices
    first, second = _two_processes(argv + ["--tensor-parallel", "2"], str(tmp_path))
    rows = [(r["token_ids"], r["accept_lengths"]) for r in _json_lines(first.stdout) if "token_ids" in r]
    assert rows == alone and len(rows) == 2
    assert second.stdout.strip() == ""  # process 0 prints; the others computed the same


@pytest.mark.slow
def test_two_processes_train_with_the_losses_of_one(tmp_path, capsys):
    text = tmp_path / "code.txt"
    text.write_text("def square(x):\n    return x * x\n\nfor i in range(10):\n    print(square(i))\n" * 8)
    argv = ["train", "--target", TARGET, "--data", str(text), "--max-steps", "2", "--batch-size", "2",
            "--ttt-length", "2", "--max-length", "48", "--draft-vocab-size", "256", "--save-every", "1", "--json",
            "--dtype", "float32"]
    assert main(argv + ["--output", str(tmp_path / "one")]) == 0
    alone = [r["loss_steps"] for r in _json_lines(capsys.readouterr().out) if r["event"] == "step"]
    # the batch data-parallel over the two processes (each feeds its own rows), one run directory
    first, second = _two_processes(argv + ["--output", str(tmp_path / "two"), "--devices", "2"], str(tmp_path))
    lines = _json_lines(first.stdout)
    together = [r["loss_steps"] for r in lines if r["event"] == "step"]
    assert len(together) == len(alone) == 2
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    assert lines[-1]["event"] == "summary" and lines[-1]["finished"] and second.stdout.strip() == ""
    assert os.path.isfile(tmp_path / "two" / "head" / "model.safetensors")
    metrics = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2  # written once, by process 0
