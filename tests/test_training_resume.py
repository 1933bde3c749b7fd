"""Resuming training runs that were killed: corrupt checkpoints, kill -9, no checkpoint yet, bad --output.

Every run here trains a tiny Qwen3 (made with ``transformers``, never
downloaded) with a word-level tokenizer on a text file, for a few steps.
The runs share a persistent compilation cache, so that the train step, the
same program in every run, is compiled once instead of once per run.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import make_hf_model

from eagle3_jax.cli import main
from eagle3_jax.errors import CheckpointError, InputError
from eagle3_jax.training.offline import TeacherStore
from eagle3_jax.training.run import TrainJob, run_training
from eagle3_jax.training.trainer import TrainConfig
from eagle3_jax.weights.safetensors_io import SafetensorsFile

WORDS = 90
STEPS = 6


def _make_tokenizer(path) -> None:
    """A word-level tokenizer over ``w0 .. w89`` (ids 1..90, below the tiny model's 97)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(target directory, data file): a tiny target with a tokenizer, and ~10 windows of 64 words."""
    root = tmp_path_factory.mktemp("resume")
    target = root / "target"
    make_hf_model(target, seed=0)
    _make_tokenizer(target)
    rng = np.random.default_rng(0)
    words, w = [], 0
    for _ in range(620):  # a random walk, so that the next word is partly predictable
        w = (w + int(rng.integers(1, 4))) % WORDS
        words.append(f"w{w}")
    data = root / "data.txt"
    data.write_text(" ".join(words))
    return str(target), str(data)


def job(setup, output, *, resume=False, precompute=False, save_every=2, steps=STEPS) -> TrainJob:
    target, data = setup
    cfg = TrainConfig(ttt_length=2, learning_rate=3e-3, warmup_ratio=0.1, batch_size=4, max_length=64,
                      max_steps=steps, seed=1, compute_dtype="float32", save_every=save_every, keep_checkpoints=3)
    return TrainJob(target=target, data=[data], output=str(output), config=cfg, draft_vocab_size=60,
                    precompute=precompute, resume=resume, dtype="float32", export_embedding=False)


def losses(out) -> list[tuple[int, list[float]]]:
    """(step, per-TTT-step losses) of every line of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [(r["step"], r["loss_steps"]) for r in rows]


def final_state(out, step) -> list[np.ndarray]:
    """The float32 train state of checkpoint ``step`` (parameters, optimizer moments, step, key)."""
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(os.path.join(out, "checkpoints", str(step), "state"))
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def head_tensors(out) -> dict[str, np.ndarray]:
    f = SafetensorsFile(os.path.join(out, "head", "model.safetensors"))
    return {k: f.read(k) for k in f.keys()}


def assert_same_run(a, b, step=STEPS) -> None:
    """Two run directories ended with the same losses, the same final state and the same exported head, bit for bit."""
    assert losses(a) == losses(b)
    for x, y in zip(final_state(a, step), final_state(b, step), strict=True):
        np.testing.assert_array_equal(x, y)
    ha, hb = head_tensors(a), head_tensors(b)
    assert ha.keys() == hb.keys()
    for k in ha:
        np.testing.assert_array_equal(ha[k], hb[k])


def steps_in(out) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(out, "checkpoints")) if n.isdigit())


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """A run that was never interrupted."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run_training(job(setup, out), progress=False)["finished"]
    return str(out)


@pytest.fixture(scope="module")
def killed(setup, tmp_path_factory):
    """A run stopped after step 4 (as a kill would stop it): checkpoints 2 and 4, metrics of steps 1-4."""
    out = tmp_path_factory.mktemp("killed") / "run"
    run_training(job(setup, out), progress=False, stop_after=4)
    assert steps_in(out) == [2, 4] and [s for s, _ in losses(out)] == [1, 2, 3, 4]
    return str(out)


# ------------------------------------------------------------ corrupt checkpoints

def _largest_file(directory) -> str:
    files = [f for f in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def truncate_data(step_dir):
    path = _largest_file(os.path.join(step_dir, "state"))
    os.truncate(path, os.path.getsize(path) // 2)


def garbage_metadata(step_dir):
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        f.write('{"epoch": 1, "posit')


def delete_a_file(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def empty_directory(step_dir):
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)


CORRUPTIONS = [truncate_data, garbage_metadata, delete_a_file, empty_directory]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
@pytest.mark.slow
def test_resume_skips_a_corrupt_newest_checkpoint(setup, straight, killed, corrupt, tmp_path, capfd):
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    corrupt(str(out / "checkpoints" / "4"))
    capfd.readouterr()
    summary = run_training(job(setup, out, resume=True), progress=False)
    err = capfd.readouterr().err
    assert summary["finished"] and summary["steps"] == STEPS
    assert "warning: skipping checkpoint 4" in err and "can not be read (" in err
    assert "resuming from checkpoint 2" in err
    # the corrupt checkpoint is kept aside, out of orbax's way: step 4 was saved again, and rotated normally
    assert os.path.isdir(out / "corrupt-checkpoints" / "4")
    assert steps_in(out) == [2, 4, 6]
    # the metrics log was cut back to step 2, the step restored: steps 3 and 4 are logged once, by the resumed run
    assert [s for s, _ in losses(out)] == list(range(1, STEPS + 1))
    assert_same_run(out, straight)


@pytest.mark.slow
def test_a_save_killed_midway_is_ignored_and_cleaned(setup, straight, killed, tmp_path, capfd):
    """kill -9 during a save leaves orbax's temporary directory, never a step: orbax skips it and removes it."""
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    os.rename(out / "checkpoints" / "4", out / "checkpoints" / "4.orbax-checkpoint-tmp-1234567")
    run_training(job(setup, out, resume=True), progress=False)
    assert "warning" not in capfd.readouterr().err
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "4", "6"]
    assert_same_run(out, straight)


@pytest.mark.slow
def test_no_readable_checkpoint_is_a_clear_error(setup, killed, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    garbage_metadata(str(out / "checkpoints" / "4"))
    truncate_data(str(out / "checkpoints" / "2"))
    with pytest.raises(CheckpointError, match=r"no checkpoint can be read \(step 4: JSONDecodeError.*; step 2: "):
        run_training(job(setup, out, resume=True), progress=False)
    assert steps_in(out) == [2, 4] and not os.path.exists(out / "corrupt-checkpoints")  # nothing moved


@pytest.mark.slow
def test_a_resume_leaves_no_process_wide_hook(setup, killed, tmp_path, monkeypatch):
    """Constructing a Trainer, reading a broken checkpoint, restoring and saving change no process-wide hook.

    Orbax's debris of the failed read is kept quiet only while the checkpoint
    is read: ``sys.unraisablehook``, the asyncio logger and the event-loop
    policy are the same objects afterwards, and no report comes later.
    """
    import asyncio
    import gc
    import logging

    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    hook, policy, log = sys.unraisablehook, asyncio.get_event_loop_policy(), logging.getLogger("asyncio")
    disabled = log.disabled
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    truncate_data(str(out / "checkpoints" / "4"))
    summary = run_training(job(setup, out, resume=True), progress=False, stop_after=2)  # restores 2, saves 4
    assert summary["steps"] == 4 and steps_in(out) == [2, 4] and os.path.isdir(out / "corrupt-checkpoints" / "4")
    assert sys.unraisablehook is hook and asyncio.get_event_loop_policy() is policy and log.disabled == disabled
    time.sleep(0.5)
    gc.collect()
    assert reports == []


def test_a_failed_restore_finishes_its_reads_before_its_event_loop_closes(monkeypatch):
    """What orbax does when one read of a checkpoint fails, with threads for TensorStore's reads.

    Orbax runs a restore in a fresh event loop and closes it as soon as one
    read raises; the reads still in flight then complete into the closed loop
    ("Event loop is closed", reported long after the restore). Within
    ``_quiet_failed_restore`` they finish before the loop closes.
    """
    import asyncio
    import gc
    import logging
    import threading

    from eagle3_jax.training.checkpoints import _quiet_failed_restore

    late, threads = [], []

    def finish_later(loop, future):  # a TensorStore thread completing a read
        time.sleep(0.2)
        try:
            loop.call_soon_threadsafe(future.set_result, b"data")
        except RuntimeError as e:
            late.append(str(e))

    async def restore():
        loop = asyncio.get_running_loop()

        async def read():
            future = loop.create_future()
            threads.append(threading.Thread(target=finish_later, args=(loop, future)))
            threads[-1].start()
            return await future

        async def broken():
            raise ValueError("truncated")

        await asyncio.gather(read(), read(), broken())

    def run_like_orbax():
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(restore())
        finally:
            loop.close()

    hook, policy = sys.unraisablehook, asyncio.get_event_loop_policy()
    with _quiet_failed_restore(), pytest.raises(ValueError, match="truncated"):
        run_like_orbax()
    assert sys.unraisablehook is hook and asyncio.get_event_loop_policy() is policy
    for t in threads:
        t.join()
    assert late == []
    # the same without it: both reads end in the closed loop (their pending tasks are dropped quietly here)
    threads.clear()
    with pytest.raises(ValueError, match="truncated"):
        run_like_orbax()
    for t in threads:
        t.join()
    assert late == ["Event loop is closed"] * 2
    monkeypatch.setattr(logging.getLogger("asyncio"), "disabled", True)
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)
    gc.collect()


# ------------------------------------------------------------ kill -9

def _cli_args(setup, out, steps) -> list[str]:
    target, data = setup
    return ["train", "--target", target, "--data", data, "--output", str(out), "--max-steps", str(steps),
            "--batch-size", "4", "--ttt-length", "2", "--max-length", "64", "--draft-vocab-size", "60",
            "--lr", "3e-3", "--warmup-ratio", "0.1", "--seed", "1", "--save-every", "3", "--keep-checkpoints", "3",
            "--dtype", "float32", "--compute-dtype", "float32", "--no-export-embedding", "--json"]


@pytest.mark.slow
def test_kill_9_then_resume_with_a_corrupt_checkpoint(setup, tmp_path):
    steps = 30
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "eagle3_jax.cli"]
    env = dict(os.environ)  # with the session's compilation cache (tests/conftest.py): the runs share programs
    log = tmp_path / "killed.err"
    with open(log, "w") as err:
        proc = subprocess.Popen(cli + _cli_args(setup, out, steps), stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (os.path.isdir(out / "checkpoints") and len(steps_in(out)) >= 2):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    newest = steps_in(out)[-1]
    assert newest < steps, "the run finished before it was killed"
    truncate_data(str(out / "checkpoints" / str(newest)))
    done = subprocess.run(cli + _cli_args(setup, out, steps) + ["--resume"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"warning: skipping checkpoint {newest}" in done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])  # --json: a line per step, the summary last
    assert summary["event"] == "summary" and summary["steps"] == steps
    # the same, bit for bit, as a run that was never killed (run here, in this process)
    straight = tmp_path / "straight"
    assert main(_cli_args(setup, straight, steps)) == 0
    assert [s for s, _ in losses(out)] == list(range(1, steps + 1))
    assert_same_run(out, straight, step=steps)


# ------------------------------------------------------------ killed before the first checkpoint

@pytest.mark.slow
def test_killed_before_the_first_checkpoint_resumes_and_reuses_the_teacher(setup, straight, tmp_path, monkeypatch,
                                                                          capfd):
    from eagle3_jax.atomic import LOCK_NAME

    first = tmp_path / "first"
    early = job(setup, first, precompute=True, save_every=100)
    summary = run_training(early, progress=False, stop_after=2)  # the teacher is complete; no checkpoint yet
    assert not summary["finished"] and not os.path.exists(first / "checkpoints")
    index = first / "teacher" / "teacher_index.json"
    stamp = index.stat().st_mtime_ns
    # a second copy, killed in the middle of computing the teacher: only the partial sibling exists
    second = tmp_path / "second"
    shutil.copytree(first, second)
    partial = second / ".teacher.partial-killed"
    os.rename(second / "teacher", partial)
    os.remove(partial / "teacher_index.json")
    os.remove(partial / "00000003.safetensors")
    (partial / LOCK_NAME).touch()  # the lock file of a build whose process is gone

    # without --resume the run is not overwritten, and the message says how to continue it
    with pytest.raises(InputError, match="pass --resume to continue it"):
        run_training(early, progress=False)

    # resumed: from step 0, with the complete teacher reused, not recomputed
    built = []
    real_build = TeacherStore.build.__func__
    monkeypatch.setattr(TeacherStore, "build",
                        classmethod(lambda cls, *a, **k: built.append(a[2]) or real_build(cls, *a, **k)))
    capfd.readouterr()
    summary = run_training(job(setup, first, precompute=True, save_every=100, resume=True), progress=False)
    assert "no checkpoint was saved before the run stopped; training from step 0" in capfd.readouterr().err
    assert summary["finished"] and built == [] and index.stat().st_mtime_ns == stamp
    assert [s for s, _ in losses(first)] == list(range(1, STEPS + 1))
    # the precomputed teacher gives the online teacher's losses up to float rounding
    for (_, a), (_, b) in zip(losses(first), losses(straight), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4)

    # the half-written teacher is not trusted: it is computed again, and the partial directory is removed
    summary = run_training(job(setup, second, precompute=True, save_every=100, resume=True), progress=False)
    assert summary["finished"] and built == [str(second / "teacher")]
    assert not partial.exists() and TeacherStore(str(second / "teacher")).index["count"] == summary["examples"]
    assert losses(second) == losses(first)


def test_an_incomplete_teacher_store_is_refused(setup, tmp_path):
    from eagle3_jax import load_target
    from eagle3_jax.training.data import Example

    target = load_target(setup[0], dtype="float32", progress=False)
    examples = [Example(np.arange(1, 9, dtype=np.int32), np.ones(8, np.int32)) for _ in range(3)]
    store = tmp_path / "teacher"
    TeacherStore.build(target, examples, str(store), (1, 2, 3), "f", 64, progress=False)
    assert TeacherStore(str(store), "f").index["count"] == 3
    assert TeacherStore(str(store), "f").batch([0], 8, 1)[2].dtype == np.int32  # the argmax of every position
    os.remove(store / "00000001.safetensors")
    with pytest.raises(CheckpointError, match=r"incomplete \(1 of 3 example files missing, first 00000001"):
        TeacherStore(str(store), "f")
    # a store of the first format (no argmax) is refused, so that a run computes it again
    index = json.loads((store / "teacher_index.json").read_text())
    del index["version"]
    (store / "teacher_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"another version of eagle3-jax \(store format 1, not 2\)"):
        TeacherStore(str(store), "f")


def test_a_stopped_teacher_build_resumes_where_it_stopped(setup, tmp_path, monkeypatch, capsys):
    from eagle3_jax import load_target
    from eagle3_jax.training import offline
    from eagle3_jax.training.data import Example

    target = load_target(setup[0], dtype="float32", progress=False)
    rng = np.random.default_rng(0)
    lengths = [5, 70, 9, 64, 100, 3, 65, 30, 128]
    examples = [Example(rng.integers(1, 90, n).astype(np.int32), np.ones(n, np.int32)) for n in lengths]
    monkeypatch.setattr(offline, "TOKENS_PER_FORWARD", 128)  # 2 rows a forward at bucket 64, 1 at 128
    plan = offline.forward_plan(lengths, 128)
    assert plan == [([0, 2], 64), ([3, 5], 64), ([7], 64), ([1], 128), ([4], 128), ([6], 128), ([8], 128)]

    def read(store):
        return [(f.read("features"), f.read("hidden"), f.read("argmax"))
                for f in (SafetensorsFile(os.path.join(store, f"{i:08d}.safetensors")) for i in range(len(lengths)))]

    straight = str(tmp_path / "straight")
    TeacherStore.build(target, examples, straight, (1, 2, 3), "f", 128, progress=False)

    # stopped in the middle of its second batch: the first batch's files and one of the second's are kept
    real_save, saved = offline._save_atomically, []

    def stop_after_three(tensors, path):
        if len(saved) == 3:
            raise KeyboardInterrupt
        real_save(tensors, path)
        saved.append(os.path.basename(path))

    monkeypatch.setattr(offline, "_save_atomically", stop_after_three)
    store = str(tmp_path / "teacher")
    with pytest.raises(KeyboardInterrupt):
        TeacherStore.build(target, examples, store, (1, 2, 3), "f", 128, progress=False)
    work = tmp_path / ".teacher.building"
    assert not os.path.exists(store) and sorted(os.listdir(work)) == sorted(saved + ["build.json"])
    inodes = {name: os.stat(work / name).st_ino for name in saved[:2]}

    # resumed: only the batches not complete are computed; the store equals the straight build exactly
    monkeypatch.setattr(offline, "_save_atomically", lambda t, p: saved.append(os.path.basename(p)) or real_save(t, p))
    saved.clear()
    TeacherStore.build(target, examples, store, (1, 2, 3), "f", 128, progress=False)
    assert saved == [f"{i:08d}.safetensors" for i in (3, 5, 7, 1, 4, 6, 8)]  # the half-saved batch again
    assert all(os.stat(os.path.join(store, name)).st_ino == ino for name, ino in inodes.items())
    assert not work.exists() and TeacherStore(store, "f").index["count"] == len(lengths)
    for a, b in zip(read(straight), read(store), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    # the batched forward gives each example what it gets alone (padding rows and columns change nothing)
    alone = str(tmp_path / "alone")
    monkeypatch.setattr(offline, "TOKENS_PER_FORWARD", 1)
    TeacherStore.build(target, examples, alone, (1, 2, 3), "f", 128, progress=False)
    for (fa, ha, aa), (fb, hb, ab) in zip(read(alone), read(store), strict=True):
        np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ha, hb, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(aa, ab)

    # a work directory left by a build for other data is started afresh, with a warning
    monkeypatch.setattr(offline, "_save_atomically", stop_after_three)
    saved.clear()
    other = str(tmp_path / "other")
    with pytest.raises(KeyboardInterrupt):
        TeacherStore.build(target, examples, other, (1, 2, 3), "f", 128, progress=False)
    monkeypatch.setattr(offline, "_save_atomically", real_save)
    capsys.readouterr()
    TeacherStore.build(target, examples, other, (1, 2, 3), "g", 128, progress=False)
    assert "a stopped teacher build for other data or feature layers; starting afresh" in capsys.readouterr().err
    assert TeacherStore(other, "g").index["count"] == len(lengths)

    # a directory of that name that no build made is never touched
    (tmp_path / ".mine.building").mkdir()
    (tmp_path / ".mine.building" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="is in the way of the teacher store's build"):
        TeacherStore.build(target, examples, str(tmp_path / "mine"), (1, 2, 3), "f", 128, progress=False)
    assert os.listdir(tmp_path / ".mine.building") == ["notes.txt"] and not (tmp_path / "mine").exists()


# ------------------------------------------------------------ --output checked up front

def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_output_directories_fail_before_loading_anything(setup, tmp_path, capsys, monkeypatch):
    missing_target = str(tmp_path / "no-such-target")  # never reached: the output is checked first
    args = lambda out, *extra: ["train", "--target", missing_target, "--data", setup[1], "--output", str(out),
                                *extra]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    assert main(args(a_file)) == 1
    assert "must be a run directory, but this is a file" in _one_error_line(capsys.readouterr().err)
    assert main(args(a_file / "run")) == 1  # its parent is a file: nothing can be written there
    assert "can not write the run directory" in _one_error_line(capsys.readouterr().err)
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(args(other)) == 1
    assert "holds no training run of eagle3-jax" in _one_error_line(capsys.readouterr().err)
    assert main(args(other, "--resume")) == 1
    assert "nothing to resume (not a training run" in _one_error_line(capsys.readouterr().err)
    assert main(args(tmp_path / "nowhere", "--resume")) == 1
    assert "nothing to resume (no such directory)" in _one_error_line(capsys.readouterr().err)
    assert os.listdir(other) == ["notes.txt"] and a_file.read_text() == "not a directory"

    def refuse(*_, **__):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:  # a directory this user may not write in (tests may run as root)
        m.setattr("tempfile.mkstemp", refuse)
        assert main(args(tmp_path / "read-only")) == 1
    assert "can not write the run directory (Permission denied)" in _one_error_line(capsys.readouterr().err)
    # a run that failed before it wrote anything but run.json can simply be started again
    fresh = tmp_path / "fresh"
    assert main(args(fresh)) == 1
    assert "no-such-target" in _one_error_line(capsys.readouterr().err)
    assert sorted(os.listdir(fresh)) == [".eagle3_jax.lock", "run.json"]  # the job and the run's lock file
    assert main(args(fresh)) == 1
    assert "no-such-target" in _one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_resume_with_another_head_shape_is_refused(setup, tmp_path):
    """The checkpoint records the head's config: another draft vocabulary or feature layers is a clear refusal."""
    import dataclasses

    out = tmp_path / "run"
    assert not run_training(job(setup, out, steps=4), progress=False, stop_after=2)["finished"]
    for change in (dict(draft_vocab_size=50), dict(feature_layers=(1, 2, 3))):
        other = dataclasses.replace(job(setup, out, resume=True, steps=4), **change)
        with pytest.raises(InputError, match="other (draft_vocab_size|feature layers)"):
            run_training(other, progress=False)
    assert run_training(job(setup, out, resume=True, steps=4), progress=False)["finished"]


@pytest.mark.slow
def test_one_run_directory_one_process(setup, tmp_path):
    """A second training process on a run directory in use is refused, with or without --resume."""
    from eagle3_jax.training.run import LOCK_FILE, lock_run_directory, prepare_run_directory

    out = prepare_run_directory(str(tmp_path / "run"), resume=False)
    held = lock_run_directory(out)  # another live run
    try:
        (tmp_path / "run" / "run.json").write_text(json.dumps({"format": "eagle3-jax training run"}))
        for resume in (False, True):
            with pytest.raises(InputError, match="in use by another training process"):
                run_training(job(setup, out, resume=resume), progress=False)
    finally:
        os.close(held)
    assert sorted(os.listdir(out)) == [LOCK_FILE, "run.json"]
    assert run_training(job(setup, out, steps=2), progress=False)["finished"]  # restartable: nothing was computed
