"""A whole training run, from a target and data files to an exported head.

The run directory holds everything a run produces: ``run.json`` (the job,
written first: it marks the directory as a run of eagle3-jax),
``checkpoints/`` (orbax), ``metrics.jsonl`` (one line per step),
``vocab.json`` (the vocabulary map's coverage), ``teacher/`` (with
``precompute``; ``.teacher.building/`` while it is computed),
``summary.json`` and, when training ends, ``head/``, the trained head in
the SpecForge/SGLang format (written atomically);
``corrupt-checkpoints/`` holds checkpoints a resume found unreadable.

A run killed at any point continues with ``resume``: from its newest
readable checkpoint, or from step 0 when none was saved yet, reusing the
precomputed teacher, or as much of it as was computed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eagle3_jax import sharding
from eagle3_jax.atomic import atomic_file, try_lock
from eagle3_jax.config import Eagle3Config
from eagle3_jax.errors import CheckpointError, ConfigError, InputError
from eagle3_jax.hub import resolve_model_dir
from eagle3_jax.loading import load_draft, load_target, save_draft
from eagle3_jax.models.eagle3 import Eagle3DraftHead
from eagle3_jax.sharding import to_host
from eagle3_jax.training.checkpoints import CHECKPOINTS, warn
from eagle3_jax.training.data import Batcher, load_examples
from eagle3_jax.training.offline import TeacherStore, is_teacher_store
from eagle3_jax.training.trainer import TrainConfig, Trainer
from eagle3_jax.training.vocab import coverage, token_counts, vocab_map


@dataclasses.dataclass
class TrainJob:
    """What ``eagle3-jax train`` does, as data.

    Attributes:
      target: the target model (directory or Hub id).
      data: training sources (JSONL conversations, text files, ``hf:NAME``).
      output: the run directory.
      config: the optimisation knobs.
      draft_vocab_size: size of the draft vocabulary of a new head.
      init_head: start from this head (its vocabulary map is kept) instead of a new one.
      feature_layers: target layers feeding a new head (default [2, L//2, L-3]).
      precompute: run the target once over the data and train from disk.
      resume: continue the run in ``output`` from its newest readable checkpoint (from step 0 if it
        stopped before its first one).
      devices: data-parallel devices (None: all devices, over ``tensor_parallel``).
      tensor_parallel: devices the frozen target is split over (heads, MLP, vocabulary).
      dtype: the target's dtype (None: bfloat16 on accelerators, float32 on CPU).
      export_embedding: write the target's embedding into the exported head
        (``embed_tokens.weight``), which SpecForge needs to reload it; SGLang
        and vLLM use the target's anyway.
    """

    target: str
    data: list[str]
    output: str
    config: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    draft_vocab_size: int = 32000
    init_head: str | None = None
    feature_layers: tuple[int, ...] | None = None
    precompute: bool = False
    resume: bool = False
    devices: int | None = None
    tensor_parallel: int = 1
    dtype: str | None = None
    export_embedding: bool = True


RUN_FILE = "run.json"
# Below this share of the training tokens in the draft vocabulary, most positions teach nothing.
MIN_COVERAGE = 0.5
LOCK_FILE = ".eagle3_jax.lock"
# What a run that stopped before computing anything holds: it may start again without --resume.
RESTARTABLE = {RUN_FILE, "vocab.json", LOCK_FILE}
RUN_FORMAT = "eagle3-jax training run"
TEACHER = "teacher"


def _read_json(path: str):
    """The JSON value in ``path``, or None if it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, value) -> None:
    """Writes ``value`` to ``path`` atomically (a kill leaves the old file or the new one, never half of one)."""
    with atomic_file(path, overwrite=True) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)


def is_run_directory(path: str) -> bool:
    """Whether ``path`` holds a training run of eagle3-jax.

    A run writes ``run.json`` before anything else; a run begun by an older
    version, which had none, is recognised by its ``checkpoints/`` or its
    ``vocab.json``.
    """
    info = _read_json(os.path.join(path, RUN_FILE))
    if isinstance(info, dict) and info.get("format") == RUN_FORMAT:
        return True
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        return True
    vocab = _read_json(os.path.join(path, "vocab.json"))
    return isinstance(vocab, dict) and {"draft_vocab_size", "coverage_of_training_tokens"} <= set(vocab)


def prepare_run_directory(output: str, resume: bool, *, create: bool = True) -> str:
    """Checks ``output`` before any expensive work, creates it, and returns its absolute path.

    Without ``resume`` it must be new, empty, or a run that stopped before
    writing anything but its ``run.json``; with ``resume`` it must be a run
    directory (:func:`is_run_directory`). In both cases it must be a
    directory that can be written. Raises InputError otherwise.
    ``create=False`` only checks (nothing is created or written).
    """
    out = os.path.abspath(os.path.expanduser(output))
    if os.path.lexists(out) and not os.path.isdir(out):
        kind = "a broken symbolic link" if not os.path.exists(out) else "a file"
        raise InputError(f"{out}: --output must be a run directory, but this is {kind}; choose another --output")
    if resume:
        if not os.path.isdir(out):
            raise InputError(f"{out}: nothing to resume (no such directory); drop --resume to start a new run")
        if not is_run_directory(out):
            raise InputError(f"{out}: nothing to resume (not a training run of eagle3-jax: no {RUN_FILE} or "
                             f"{CHECKPOINTS}/)")
    elif os.path.isdir(out) and os.listdir(out):
        if not is_run_directory(out):
            raise InputError(f"{out}: the directory is not empty and holds no training run of eagle3-jax; "
                             "choose a new or empty --output")
        if not set(os.listdir(out)) <= RESTARTABLE:  # stopped before it computed anything: nothing to lose
            raise InputError(f"{out}: the run directory is not empty (pass --resume to continue it from its "
                             "newest checkpoint, or choose another --output)")
    if not create:
        return out
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{out}: can not write the run directory ({e.strerror or e})") from None
    return out


def lock_run_directory(out: str) -> int:
    """Takes the run directory for this process (an ``flock`` on its lock file, released when the
    process ends, however it ends); returns the descriptor to keep open. Another live run of the same
    directory is a clear error, never two runs writing one directory."""
    fd = try_lock(os.path.join(out, LOCK_FILE), create=True)
    if fd is None:
        raise InputError(f"{out}: the run directory is in use by another training process; wait for it to "
                         "finish (or stop it), or choose another --output")
    return fd


def write_run_file(out: str, job: TrainJob) -> None:
    """Records the job in ``out/run.json`` (the last start's knobs; it also marks the directory as a run)."""
    knobs = {k: v for k, v in dataclasses.asdict(job).items() if k not in ("output", "resume")}
    _write_json(os.path.join(out, RUN_FILE), {"format": RUN_FORMAT, "version": 1, **knobs})


def prepare_teacher(target, examples, out: str, feature_layers: tuple[int, ...], fingerprint: str,
                    max_length: int, progress: bool = True) -> TeacherStore:
    """The run's precomputed teacher, ``out/teacher``: reused if complete and made for this data, else (re)built.

    :meth:`TeacherStore.build` resumes a build that was stopped (its work
    directory ``out/.teacher.building`` keeps every finished example), so a
    stopped run loses at most one batch of the teacher; a ``teacher/`` that
    is incomplete, or was computed for other data or feature layers, is
    replaced with a warning. A ``teacher/`` that is not a teacher store is
    never replaced (CheckpointError).
    """
    store_dir = os.path.join(out, TEACHER)
    if os.path.lexists(store_dir) and is_teacher_store(store_dir):
        try:
            store = TeacherStore(store_dir, fingerprint)
        except CheckpointError as e:
            warn(f"recomputing the teacher: {e}")
        else:
            if store.index.get("feature_layers") == list(feature_layers):
                return store
            warn(f"recomputing the teacher: {store_dir} was computed for feature layers "
                 f"{store.index.get('feature_layers')}, not {list(feature_layers)}")
    return TeacherStore.build(target, examples, store_dir, feature_layers, fingerprint, max_length,
                              progress=progress, overwrite=True)


def set_vocab_map(head: Eagle3DraftHead, d2t: np.ndarray, t2d: np.ndarray) -> None:
    head.d2t.value = jnp.asarray(d2t, jnp.int32)
    head.t2d.value = jnp.asarray(t2d, bool)


def new_head(target_config, draft_vocab_size: int, feature_layers, seed: int) -> Eagle3DraftHead:
    cfg = Eagle3Config.for_target(target_config, draft_vocab_size=draft_vocab_size, feature_layers=feature_layers)
    cfg.check_target(target_config, where="the new head")
    return Eagle3DraftHead(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))


def make_mesh(devices: int | None, tensor_parallel: int = 1):
    """The training mesh: ``devices`` data-parallel groups (None: as many as there are devices for) of
    ``tensor_parallel`` devices each; None for a single device."""
    available = jax.devices()
    tp = tensor_parallel
    n = len(available) // tp if devices is None else devices
    if n < 1 or n * tp > len(available):
        raise InputError(f"asked for {max(n, 1)} data-parallel x {tp} tensor-parallel devices but "
                         f"{len(available)} are available")
    if jax.process_count() > 1 and n * tp != len(available):
        raise InputError(f"a multi-process run must use every process's devices: --devices {n} x --tensor-parallel "
                         f"{tp} = {n * tp}, but there are {len(available)}")
    if n * tp == 1:
        return None
    return sharding.make_mesh(tp, n)


def run_training(job: TrainJob, *, progress: bool = True, stop_after: int | None = None,
                 on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Runs (or resumes) a training job; returns its summary (also written to ``summary.json``).

    The run directory is checked (and created) before anything is loaded. With
    ``job.resume`` the run continues from its newest readable checkpoint
    (:meth:`Trainer.restore_latest`), or from step 0 when it was stopped before
    its first one. ``on_step(step, metrics)``, if given, is called after every
    step, as it happens, with that step's line of ``metrics.jsonl`` (as a dict)
    and ``total_steps``.
    """
    mesh = make_mesh(job.devices, job.tensor_parallel)  # what needs no model is checked before anything is written
    if jax.process_count() == 1:
        out = prepare_run_directory(job.output, job.resume)
        lock = lock_run_directory(out)
        try:
            return _run(job, out, mesh, progress=progress, stop_after=stop_after, on_step=on_step)
        finally:
            os.close(lock)
    # several processes, one run directory on a filesystem they all see: every process checks it, then
    # process 0 creates, locks and writes it; the others only take part in the checkpoints' writes
    from jax.experimental import multihost_utils

    if job.precompute:
        raise InputError("--precompute is not supported in a multi-process run; train with the target online")
    out = prepare_run_directory(job.output, job.resume, create=False)
    multihost_utils.sync_global_devices("eagle3_jax: run directory checked")
    lock = failure = None
    if jax.process_index() == 0:
        try:
            out = prepare_run_directory(job.output, job.resume)
            lock = lock_run_directory(out)
        except InputError as e:  # said to the others before raising: they would otherwise wait forever
            failure = e
    ready = int(multihost_utils.broadcast_one_to_all(np.int32(failure is None)))
    if failure is not None:
        raise failure
    if not ready:
        raise InputError(f"{out}: process 0 could not prepare the run directory (its error says why)")
    try:
        return _run(job, out, mesh, progress=progress and jax.process_index() == 0, stop_after=stop_after,
                    on_step=on_step)
    finally:
        if lock is not None:
            os.close(lock)


def _run(job: TrainJob, out: str, mesh, *, progress: bool, stop_after: int | None,
         on_step: Callable[[int, dict], None] | None = None) -> dict:
    cfg = job.config
    main = jax.process_index() == 0  # the process that writes the run's files (all of them write checkpoints)
    if main:
        write_run_file(out, job)
    target_dir = resolve_model_dir(job.target)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = load_target(target_dir, dtype=job.dtype, progress=progress, mesh=mesh)
    examples = load_examples(job.data, tokenizer, cfg.max_length)
    batcher = Batcher(examples, cfg.batch_size, cfg.max_length, cfg.seed)

    counts = token_counts(examples, target.config.vocab_size)
    if job.init_head:
        head = load_draft(job.init_head, target.config, dtype="float32", progress=progress)
        if head.config.norm_before_residual:
            raise ConfigError(f"{job.init_head}: a speculators head with norm_before_residual=true can not be "
                              "exported in the SpecForge format training writes; start from another head")
    else:
        head = new_head(target.config, min(job.draft_vocab_size, target.config.vocab_size), job.feature_layers,
                        cfg.seed)
        set_vocab_map(head, *vocab_map(counts, head.config.draft_vocab_size))
    vocab_info = {"draft_vocab_size": head.config.draft_vocab_size,
                  "coverage_of_training_tokens": coverage(counts, np.asarray(head.t2d[...])),
                  "training_tokens": int(counts.sum())}
    if main:
        _write_json(os.path.join(out, "vocab.json"), vocab_info)
    share = vocab_info["coverage_of_training_tokens"]
    if share == 0:  # every position would be masked out of the loss: nothing to learn
        raise InputError(f"the draft vocabulary ({head.config.draft_vocab_size} ids) covers none of the training "
                         "tokens, so no position can be trained; raise --draft-vocab-size")
    if share < MIN_COVERAGE:
        warn(f"the draft vocabulary ({head.config.draft_vocab_size} ids) covers only {share:.1%} of the training "
             "tokens; positions whose next token lies outside it are not trained (raise --draft-vocab-size)")

    trainer = Trainer(target, head, batcher, cfg, out, mesh=mesh)
    if job.resume and not trainer.restore_latest():
        warn(f"{out}: no checkpoint was saved before the run stopped; training from step 0")
    if job.precompute:  # after the restore, which refuses a checkpoint made for other data before this costs anything
        trainer.teacher_store = prepare_teacher(target, examples, out, trainer.layers, trainer.fingerprint,
                                                cfg.max_length, progress=progress)
    hook = None if on_step is None else (lambda step, row: on_step(step, {**row, "total_steps": trainer.total_steps}))
    history = trainer.run(progress=progress, log_path=os.path.join(out, "metrics.jsonl") if main else None,
                          stop_after=stop_after, on_step=hook)
    if history and all(row.get("loss") == 0 for row in history):
        warn("every step's loss was 0: no position had a next token inside the draft vocabulary, so the head "
             "learned nothing (raise --draft-vocab-size, or check the data's loss masks)")
    finished = trainer.step >= trainer.total_steps
    summary = {"steps": trainer.step, "total_steps": trainer.total_steps, "finished": finished,
               "examples": len(examples), "batches_per_epoch": trainer.batches_per_epoch, **vocab_info,
               "last": history[-1] if history else None, "config": dataclasses.asdict(cfg)}
    if finished:
        embedding = target.model.embed_tokens.embedding[...] if job.export_embedding else None
        head = trainer.head()
        embedding = to_host(embedding) if embedding is not None else None
        summary["head"] = os.path.join(out, "head")
        if main:
            save_draft(head, summary["head"], embedding=embedding, overwrite=True)
    if main:
        _write_json(os.path.join(out, "summary.json"), summary)
    return summary
