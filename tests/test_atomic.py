"""Outputs appear whole or not at all, and nothing of the user's is ever deleted."""

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from eagle3_jax.atomic import atomic_directory, atomic_file, clean_stale_partials
from eagle3_jax.errors import CheckpointError
from eagle3_jax.models.registry import read_target_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "ours.txt"


def ours(path):
    return os.path.isfile(os.path.join(path, MARK))


def write_output(tmp, text="new"):
    with open(os.path.join(tmp, MARK), "w") as f:
        f.write(text)


def leftovers(parent):
    return sorted(glob.glob(os.path.join(str(parent), ".*")))


def test_output_appears_whole(tmp_path):
    dst = tmp_path / "out"
    with atomic_directory(dst, replaceable=ours) as tmp:
        write_output(tmp)
        assert not dst.exists()
    assert (dst / MARK).read_text() == "new" and sorted(os.listdir(dst)) == [MARK]
    assert leftovers(tmp_path) == []


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out", replaceable=ours) as tmp:
            write_output(tmp)
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_user_directory_created_meanwhile_is_kept(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="appeared while"):
        with atomic_directory(dst, replaceable=ours) as tmp:
            write_output(tmp)
            dst.mkdir()
            (dst / "mine.txt").write_text("precious")
    assert sorted(os.listdir(dst)) == ["mine.txt"] and (dst / "mine.txt").read_text() == "precious"
    assert leftovers(tmp_path) == []


def test_user_file_created_meanwhile_is_kept(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="appeared while"):
        with atomic_directory(dst, replaceable=ours) as tmp:
            write_output(tmp)
            dst.write_text("precious")
    assert dst.read_text() == "precious" and leftovers(tmp_path) == []


def test_overwrite_replaces_only_our_outputs(tmp_path):
    dst = tmp_path / "out"
    with atomic_directory(dst, replaceable=ours) as tmp:
        write_output(tmp, "first")
    with atomic_directory(dst, overwrite=True, replaceable=ours) as tmp:
        write_output(tmp, "second")
    assert (dst / MARK).read_text() == "second" and leftovers(tmp_path) == []
    user = tmp_path / "user"
    user.mkdir()
    (user / "mine.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(CheckpointError):
            with atomic_directory(user, overwrite=overwrite, replaceable=ours):
                pass
    assert sorted(os.listdir(user)) == ["mine.txt"]


def test_overwrite_never_replaces_a_user_directory_swapped_in_meanwhile(tmp_path):
    dst = tmp_path / "out"
    with atomic_directory(dst, replaceable=ours) as tmp:
        write_output(tmp, "first")
    with pytest.raises(CheckpointError, match="not an output of eagle3-jax"):
        with atomic_directory(dst, overwrite=True, replaceable=ours) as tmp:
            write_output(tmp, "second")
            (dst / MARK).unlink()
            (dst / "mine.txt").write_text("precious")
    assert sorted(os.listdir(dst)) == ["mine.txt"] and leftovers(tmp_path) == []


def test_symlink_destination_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    with atomic_directory(target, replaceable=ours) as tmp:
        write_output(tmp, "first")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(CheckpointError, match="symbolic link"):
        with atomic_directory(link, overwrite=True, replaceable=ours):
            pass
    assert (target / MARK).read_text() == "first" and link.is_symlink()


def test_empty_directory_is_a_destination_only_where_allowed(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        with atomic_directory(dst, replaceable=ours):
            pass
    with atomic_directory(dst, replaceable=ours, empty_ok=True) as tmp:
        write_output(tmp)
    assert sorted(os.listdir(dst)) == [MARK]


def test_unwritable_parent_fails_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="can not write"):
        with atomic_directory(blocker / "out"):
            pytest.fail("the block must not run")


def test_atomic_file(tmp_path):
    dst = tmp_path / "data.jsonl"
    with atomic_file(dst) as tmp:
        with open(tmp, "w") as f:
            f.write("a\n")
    assert dst.read_text() == "a\n"
    with pytest.raises(CheckpointError, match="already exists"):
        with atomic_file(dst):
            pass
    other = tmp_path / "other.jsonl"
    with pytest.raises(CheckpointError, match="appeared while"):
        with atomic_file(other) as tmp:
            other.write_text("precious")
    assert other.read_text() == "precious"
    with atomic_file(dst, overwrite=True) as tmp:
        with open(tmp, "w") as f:
            f.write("b\n")
    assert dst.read_text() == "b\n" and leftovers(tmp_path) == []
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="not a file"):
        with atomic_file(tmp_path / "d", overwrite=True):
            pass


# ---------------------------------------------------------------- processes

HOLD = textwrap.dedent("""
    import os, sys, time
    from eagle3_jax.atomic import atomic_directory
    from eagle3_jax.errors import CheckpointError
    dst, me, other, hold = sys.argv[1:5]
    try:
        with atomic_directory(dst, replaceable=lambda p: False) as tmp:
            open(os.path.join(tmp, "who"), "w").write(me)
            open(me + ".ready", "w").close()
            deadline = time.time() + 60
            while not os.path.exists(other + ".ready") and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(float(hold))
    except CheckpointError as e:
        print("error:", e, file=sys.stderr)
        sys.exit(1)
""")


def _spawn(*args):
    return subprocess.Popen([sys.executable, "-c", HOLD, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_processes_one_destination_exactly_one_wins(tmp_path):
    dst = tmp_path / "out"
    a = _spawn(dst, tmp_path / "a", tmp_path / "b", 0)
    b = _spawn(dst, tmp_path / "b", tmp_path / "a", 0)
    results = [(p.wait(timeout=120), p.stderr.read()) for p in (a, b)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "appeared while" in loser and "Traceback" not in loser
    winner = "a" if results[0][0] == 0 else "b"
    assert (dst / "who").read_text().endswith(winner)
    assert sorted(os.listdir(tmp_path)) == ["a.ready", "b.ready", "out"]


def test_kill_9_leaves_a_partial_that_the_next_writer_removes(tmp_path):
    dst = tmp_path / "out"
    live = _spawn(dst, tmp_path / "live", tmp_path / "live", 600)  # holds its partial output for 10 minutes
    dead = _spawn(dst, tmp_path / "dead", tmp_path / "dead", 600)
    try:
        for name in ("live", "dead"):
            deadline = time.time() + 60
            while not (tmp_path / f"{name}.ready").exists():
                assert time.time() < deadline, "the writer did not start"
                time.sleep(0.05)
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
        foreign = tmp_path / ".out.partial-user"  # matches the pattern but is not ours: never touched
        foreign.mkdir()
        (foreign / "mine.txt").write_text("precious")
        partials = glob.glob(str(tmp_path / ".out.partial-*"))
        assert len(partials) == 3
        removed = clean_stale_partials(dst)
        assert len(removed) == 1  # the killed writer's; the live one holds its lock
        remaining = sorted(glob.glob(str(tmp_path / ".out.partial-*")))
        assert str(foreign) in remaining and len(remaining) == 2
        assert (foreign / "mine.txt").read_text() == "precious"
    finally:
        live.kill()
        live.wait(timeout=30)
    with atomic_directory(dst) as tmp:  # the next writer cleans the live one's leftovers now that it is dead
        write_output(tmp)
    assert sorted(glob.glob(str(tmp_path / ".out.partial-*"))) == [str(foreign)]


SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    import eagle3_jax.weights.params as params
    src, dst, flag = sys.argv[1:4]
    real = params.flat_params
    def slow(module):  # called while the converted parameters are written into the partial directory
        open(flag, "w").close()
        time.sleep(600)
        return real(module)
    import eagle3_jax.weights.converted as converted
    converted.flat_params = slow
    from eagle3_jax.cli import main
    sys.exit(main(["convert", src, dst, "--json"]))
""")


@pytest.mark.slow
def test_convert_killed_then_rerun(hf_qwen3, tmp_path):
    dst, flag = tmp_path / "conv", tmp_path / "writing"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, hf_qwen3.path, str(dst), str(flag)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not flag.exists():
        assert proc.poll() is None and time.time() < deadline, "convert did not reach the write"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(glob.glob(str(tmp_path / ".conv.partial-*"))) == 1 and not dst.exists()
    done = subprocess.run([sys.executable, "-m", "eagle3_jax.cli", "convert", hf_qwen3.path, str(dst), "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert glob.glob(str(tmp_path / ".conv.partial-*")) == []
    assert (dst / "eagle3_jax.json").is_file()


@pytest.mark.slow
def test_two_converts_to_one_destination(hf_qwen3, tmp_path):
    """A target and a draft conversion race for one destination: one wins, the other fails cleanly."""
    from flax import nnx

    from eagle3_jax.config import Eagle3Config, Qwen3Config
    from eagle3_jax.loading import save_draft
    from eagle3_jax.models.eagle3 import Eagle3DraftHead

    cfg = read_target_config(hf_qwen3.path, among=Qwen3Config.MODEL_TYPES)
    head = Eagle3DraftHead(Eagle3Config.for_target(cfg, draft_vocab_size=cfg.vocab_size, feature_layers=(0, 1, 2)),
                           rngs=nnx.Rngs(0))
    head_dir = save_draft(head, tmp_path / "head")
    dst = tmp_path / "both"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmds = [[sys.executable, "-m", "eagle3_jax.cli", "convert", hf_qwen3.path, str(dst)],
            [sys.executable, "-m", "eagle3_jax.cli", "convert", "--head", head_dir, str(dst)]]
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    err = next(e for code, e in results if code == 1)
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("error:")]
    kind = "target" if results[0][0] == 0 else "draft"
    import json

    assert json.loads((dst / "eagle3_jax.json").read_text())["kind"] == kind
    assert glob.glob(str(tmp_path / ".both.*")) == []


def test_replacing_keeps_what_the_user_put_in_an_output(tmp_path):
    dst = tmp_path / "out"
    with atomic_directory(dst, replaceable=ours) as tmp:
        write_output(tmp, "first")
    (dst / "README.md").write_text("my notes")
    with atomic_directory(dst, overwrite=True, replaceable=ours) as tmp:
        write_output(tmp, "second")
    assert (dst / MARK).read_text() == "second" and (dst / "README.md").read_text() == "my notes"
    assert leftovers(tmp_path) == []


def test_outputs_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out", replaceable=ours) as tmp:
            write_output(tmp)
        with atomic_file(tmp_path / "data.jsonl") as tmp:
            open(tmp, "w").close()
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "data.jsonl").stat().st_mode & 0o777 == 0o644


def test_a_failed_output_leaves_no_parent_directories(tmp_path):
    for writer in (atomic_directory, atomic_file):
        with pytest.raises(RuntimeError):
            with writer(tmp_path / "new" / "deep" / "out"):
                raise RuntimeError("boom")
        assert os.listdir(tmp_path) == []
    with atomic_directory(tmp_path / "new" / "deep" / "out") as tmp:
        write_output(tmp)
    assert (tmp_path / "new" / "deep" / "out" / MARK).is_file()


@pytest.mark.parametrize("dst, overwrite, message", [
    (5, False, "must be a str or os.PathLike"),
    (None, False, "must be a str or os.PathLike"),
    (b"/tmp/x", False, "must be a str or os.PathLike"),
    ("", False, "non-empty path"),
    ("out", "no", "overwrite must be True or False"),
])
def test_arguments_are_checked(tmp_path, dst, overwrite, message):
    for writer in (atomic_directory, atomic_file):
        with pytest.raises(CheckpointError, match=message):
            with writer(dst, overwrite=overwrite):
                pytest.fail("the block must not run")
