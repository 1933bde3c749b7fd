"""Checkpoints of a training run: orbax saves, and a resume that survives broken checkpoints.

A run directory's checkpoints live in ``WORKDIR/checkpoints/STEP/`` (orbax
``CheckpointManager``, its default step names), each with two items:
``state``, the train state pytree (orbax ``StandardSave``: the parameters,
the optimizer state, the step, the PRNG key, the vocabulary map), and
``meta``, a JSON dict (the position in the data, the knobs, the data's
fingerprint; :data:`META_KEYS` at least).

:meth:`CheckpointStore.restore_latest` skips checkpoints that can not be read
(truncated, garbage, half-written by a kill) and restores the newest readable
one; the unreadable newer ones are moved aside to ``WORKDIR/corrupt-checkpoints/``
(never deleted) so that their steps can be saved again.

A failed orbax restore abandons the reads still in flight. Left alone, they
finish later on TensorStore's threads and each reports an error long after
the restore ("Event loop is closed", "Task exception was never retrieved",
"Exception ignored in ..."). While a checkpoint is read
(:func:`_quiet_failed_restore`), the event loop orbax makes lets those reads
finish before it closes, and their reports are dropped; nothing of this stays
in place once the read returns (``sys.unraisablehook``, the asyncio logger and
the event-loop policy are as they were).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import jax

from eagle3_jax.errors import CheckpointError, InputError
from eagle3_jax.sharding import to_host

CHECKPOINTS = "checkpoints"
CORRUPT_CHECKPOINTS = "corrupt-checkpoints"
META_KEYS = ("epoch", "position", "fingerprint", "config")
# How long a failed restore's abandoned reads may take to finish before they are cancelled.
DRAIN_SECONDS = 60.0

State = TypeVar("State")


def warn(message: str) -> None:
    """A ``warning: ...`` line on stderr (what a user should know, but not an error)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def truncate_log(path: str, step: int) -> None:
    """Drops the lines of a metrics log past ``step``: what a killed run logged after its last checkpoint.

    A resumed run repeats those steps, so without this the log would hold them twice.
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _reason(error: BaseException) -> str:
    """One line saying why a checkpoint could not be read: the root cause's first line, cut short.

    (Orbax wraps TensorStore's errors, whose messages can run to pages.)
    """
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


# ------------------------------------------------------------ a failed restore, kept quiet and finished

class _DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop that, closed with tasks still pending, first lets them finish.

    Orbax runs a restore in a fresh loop and closes it as soon as the restore
    raises; the reads still in flight would then complete into a closed loop.
    Here :meth:`close` waits for them (at most :data:`DRAIN_SECONDS`, then
    cancels what is left) and retrieves their exceptions, so that none is
    reported later.
    """

    def close(self) -> None:
        if not self.is_running() and not self.is_closed():
            deadline, drained = time.monotonic() + DRAIN_SECONDS, set()
            while pending := [t for t in asyncio.all_tasks(self) if not t.done()]:
                drained.update(pending)
                left = deadline - time.monotonic()
                if left <= 0:
                    for task in pending:
                        task.cancel()
                    self.run_until_complete(asyncio.wait(pending, timeout=1.0))
                    break
                self.run_until_complete(asyncio.wait(pending, timeout=left))
            for task in drained:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: no "Task exception was never retrieved"
        super().close()


@functools.cache
def _draining_policy_class() -> type | None:
    """A policy class that gives one thread :class:`_DrainingLoop`s and delegates all else, or None.

    None where this Python has no event-loop policies (deprecated in 3.14, to be removed).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        base = getattr(asyncio, "AbstractEventLoopPolicy", None)
    if base is None or not hasattr(asyncio, "set_event_loop_policy"):
        return None

    class DrainingPolicy(base):
        def __init__(self, previous, thread: int):
            self._previous, self._thread = previous, thread

        def new_event_loop(self):
            if threading.get_ident() == self._thread:
                return _DrainingLoop()
            return self._previous.new_event_loop()

        def get_event_loop(self):
            return self._previous.get_event_loop()

        def set_event_loop(self, loop) -> None:
            self._previous.set_event_loop(loop)

        def get_child_watcher(self):  # Python < 3.14 (the base class's raises NotImplementedError)
            return self._previous.get_child_watcher()

        def set_child_watcher(self, watcher) -> None:
            self._previous.set_child_watcher(watcher)

        def __getattr__(self, name):
            return getattr(self._previous, name)

    return DrainingPolicy


@contextlib.contextmanager
def _draining_event_loops() -> Iterator[None]:
    """Within: the event loops this thread makes (orbax makes one per restore) are :class:`_DrainingLoop`\\ s.

    Other threads get their usual loops; the previous policy is put back on exit.
    """
    policy_class = _draining_policy_class()
    if policy_class is None:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        previous = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(policy_class(previous, threading.get_ident()))
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_event_loop_policy(previous)


@contextlib.contextmanager
def _quiet_failed_restore() -> Iterator[None]:
    """Keeps the debris of a failed orbax restore off stderr, for the time of the restore only.

    When one array of a checkpoint can not be read, orbax abandons the reads
    still in flight, and each would report its own error ("Task exception
    was never retrieved", "Exception ignored in ...", "Event loop is closed"),
    with a page of TensorStore spec. The warning that skips the checkpoint
    says what matters. Within this context the abandoned reads are finished
    before orbax's event loop closes (:class:`_DrainingLoop`) and collected
    before it exits, with ``sys.unraisablehook`` and the ``asyncio`` logger
    silenced; on exit both are put back as they were.
    """
    hook, log = sys.unraisablehook, logging.getLogger("asyncio")
    disabled = log.disabled
    sys.unraisablehook, log.disabled = (lambda unraisable: None), True
    try:
        with _draining_event_loops():
            yield
    finally:
        gc.collect()
        sys.unraisablehook, log.disabled = hook, disabled


# ------------------------------------------------------------ the store

class CheckpointStore:
    """The orbax checkpoints of one run directory, ``workdir/checkpoints/STEP/{state,meta}``.

    The state is a pytree of arrays with a ``step`` field ([] int32, the
    optimizer steps taken: the checkpoint's name), e.g.
    :class:`eagle3_jax.training.trainer.TrainState`; the meta is a JSON dict
    with :data:`META_KEYS` (``config`` a dict).

    Args:
      workdir: the run directory.
      keep: checkpoints kept (older ones are deleted as new ones are saved).
    """

    def __init__(self, workdir: str, keep: int):
        self.workdir, self.keep = os.path.abspath(workdir), keep
        self._manager = None

    @property
    def directory(self) -> str:
        """``workdir/checkpoints``."""
        return os.path.join(self.workdir, CHECKPOINTS)

    @property
    def manager(self):
        """The orbax ``CheckpointManager`` of :attr:`directory`, made (and the directory created) on first use."""
        if self._manager is None:
            import orbax.checkpoint as ocp

            # cleanup_tmp_directories: a save killed midway leaves ``STEP.orbax-checkpoint-tmp-*``, which
            # orbax never lists as a step; this removes it when the manager starts.
            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True, cleanup_tmp_directories=True)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def close(self) -> None:
        """Closes the manager, so that the next use lists the checkpoint directory afresh."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def save(self, state: Any, meta: dict) -> bool:
        """Saves ``state`` and ``meta`` as checkpoint ``state.step`` and waits until it is on disk.

        Returns False (and saves nothing) when that step is already saved.
        """
        import orbax.checkpoint as ocp

        step = int(to_host(state.step))
        if step in self.manager.all_steps():
            return False
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()
        return True

    def _read_meta(self, step: int) -> dict:
        """The meta of checkpoint ``step``; raises whatever orbax raises if it is unreadable."""
        import orbax.checkpoint as ocp

        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or not all(k in meta for k in META_KEYS) or not isinstance(meta["config"], dict):
            raise ValueError("its metadata is incomplete")
        return meta

    def _read_state(self, step: int, like: State) -> State:
        """The state of checkpoint ``step``, shaped, typed and sharded as ``like``; raises if it is unreadable."""
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                                like)
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        if int(to_host(state.step)) != step:
            raise ValueError(f"it holds step {int(to_host(state.step))}")
        return state

    def _try_read(self, step: int, like: State, check: Callable[[dict], None]) -> tuple[State, dict] | str:
        """(state, meta) of checkpoint ``step``, or why it can not be read (one line).

        ``check(meta)`` runs before the state is read; its InputError (a
        checkpoint made for another run: a refusal, not a broken checkpoint)
        is raised.
        """
        with _quiet_failed_restore():
            try:
                meta = self._read_meta(step)
                check(meta)
                return self._read_state(step, like), meta
            except InputError:
                raise
            except Exception as e:  # orbax raises anything: JSONDecodeError, KeyError, FileNotFoundError, ...
                return _reason(e)

    def _set_aside(self, steps: Sequence[int]) -> None:
        """Moves unreadable checkpoints from ``checkpoints/STEP`` to ``corrupt-checkpoints/STEP``.

        They are kept for inspection (the user deletes them), out of orbax's
        way: a step directory that exists is never saved again, and the
        ``keep`` rotation would count it.
        """
        if not steps:
            return
        self.close()
        if jax.process_index() == 0:
            aside = os.path.join(self.workdir, CORRUPT_CHECKPOINTS)
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                src = os.path.join(self.directory, str(step))  # orbax's default step names: the number
                if not os.path.lexists(src):
                    continue
                dst, n = os.path.join(aside, str(step)), 1
                while os.path.lexists(dst):
                    dst, n = os.path.join(aside, f"{step}.{n}"), n + 1
                os.rename(src, dst)
                warn(f"moved the unreadable checkpoint {step} to {dst}")
        if jax.process_count() > 1:  # every host lists the checkpoints afresh only once they are moved
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("eagle3_jax: unreadable checkpoints set aside")

    def restore_latest(self, like: State, check: Callable[[dict], None] = lambda meta: None
                       ) -> tuple[State, dict] | None:
        """(state, meta) of the newest readable checkpoint; None if there is none at all.

        Args:
          like: a state of the run (arrays or ``jax.ShapeDtypeStruct``\\ s): the
            restored one has its structure, shapes, dtypes and shardings.
          check: called with each checkpoint's meta before its state is read;
            raises InputError to refuse a checkpoint made for another run.

        A checkpoint that can not be read (a file truncated or missing, garbage
        metadata, a directory emptied or half-written by a kill) is skipped
        with a warning on stderr and the next older one is tried; once one is
        restored, the unreadable newer ones are moved to ``corrupt-checkpoints/``
        (:meth:`_set_aside`). Raises CheckpointError when checkpoints exist but
        none can be read (then nothing is moved), and ``check``'s InputError.
        """
        unreadable: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            read = self._try_read(step, like, check)
            if isinstance(read, str):
                unreadable.append((step, read))
                warn(f"skipping checkpoint {step} in {self.directory}: it can not be read ({read})")
                continue
            if unreadable:
                warn(f"resuming from checkpoint {step}, the newest readable one (skipped "
                     f"{', '.join(str(s) for s, _ in unreadable)})")
            self._set_aside([s for s, _ in unreadable])
            return read
        if unreadable:
            details = "; ".join(f"step {s}: {why}" for s, why in unreadable)
            raise CheckpointError(f"{self.directory}: no checkpoint can be read ({details}); to train from "
                                  f"step 0 again, move {self.directory} away and resume")
        return None
