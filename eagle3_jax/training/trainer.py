"""Training an EAGLE-3 head: the jitted step, the optimizer, the training loop, data parallelism.

One step (all under ``jax.jit``): the frozen target runs over the batch to give
features and logits (or they are read back from a precomputed store), the
draft is unrolled ``ttt_length`` steps (:mod:`eagle3_jax.training.ttt`), and
optax AdamW with a warmup-cosine schedule and global-norm clipping updates
float32 master weights; the forward runs in ``compute_dtype``. The embedding
is the target's and stays frozen; so do ``d2t``/``t2d``.

Checkpoints (:class:`eagle3_jax.training.checkpoints.CheckpointStore`) hold
the parameters, the optimizer state, the step, the PRNG key, the vocabulary
map and the position in the data, so that a run stopped at any point and
resumed ends with the same parameters as one that never stopped; a resume
skips checkpoints that can not be read and continues from the newest
readable one.

On a device mesh (``eagle3_jax.sharding.make_mesh``: ``data`` x ``tensor``)
the batch is split over ``data``, the frozen target is tensor-parallel over
``tensor`` exactly as for inference (``eagle3_jax/sharding.py``), and the
head and its optimizer state are replicated; the loss is the same sum as on
one device, so the result matches a single-device run up to floating-point
reduction order. Multi-host runs call ``jax.distributed.initialize()`` first
(``eagle3_jax.distributed``) and build the mesh over ``jax.devices()``
(every host loads the same data and feeds its shard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from eagle3_jax.axes import DATA
from eagle3_jax.errors import InputError
from eagle3_jax.models.eagle3 import Eagle3DraftHead
from eagle3_jax.models.target import TargetModel
from eagle3_jax.sharding import ShardingPlan, check_mesh, place_target, put, put_tree, to_host
from eagle3_jax.training.checkpoints import CheckpointStore, truncate_log
from eagle3_jax.training.data import Batch, Batcher
from eagle3_jax.training.ttt import run_target, teacher_from_draft_logits, ttt_loss
from eagle3_jax.validation import check_int, check_real, check_seed

# The training-time test is unrolled in the compiled step (SpecForge's default is 7 steps), and a
# sequence of max_length tokens is one row of the target's forward: both bounded so that a typo
# can not hang the compiler or exhaust memory.
MAX_TTT_LENGTH = 32
MAX_LENGTH = 1 << 18


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Knobs of a training run (SpecForge's defaults).

    Attributes:
      ttt_length: unrolled draft steps per position (7).
      learning_rate: peak AdamW learning rate (1e-4).
      warmup_ratio: fraction of the steps spent warming up linearly (0.015).
      max_grad_norm: global-norm gradient clipping (0.5).
      weight_decay: AdamW weight decay (0).
      loss_decay: weight of TTT step i is loss_decay**i (0.8).
      batch_size: sequences per step (static; a multiple of the device count).
      max_length: longest sequence; longer ones are truncated (2048).
      epochs: passes over the data (ignored when max_steps is set).
      max_steps: total optimizer steps (None: epochs * batches per epoch).
      seed: data order.
      compute_dtype: 'bfloat16' or 'float32' for the draft's forward.
      save_every: steps between checkpoints.
      keep_checkpoints: checkpoints kept.
    """

    ttt_length: int = 7
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.015
    max_grad_norm: float = 0.5
    weight_decay: float = 0.0
    loss_decay: float = 0.8
    batch_size: int = 1
    max_length: int = 2048
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    compute_dtype: str = "bfloat16"
    save_every: int = 500
    keep_checkpoints: int = 3

    def __post_init__(self):
        for name, limit in (("ttt_length", MAX_TTT_LENGTH), ("batch_size", None), ("max_length", MAX_LENGTH),
                            ("epochs", None), ("save_every", None), ("keep_checkpoints", None)):
            check_int(name, getattr(self, name), minimum=1, maximum=limit)
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, minimum=1)
        check_seed(self.seed)
        check_real("learning_rate", self.learning_rate, minimum=0.0, open_minimum=True)
        check_real("warmup_ratio", self.warmup_ratio, minimum=0.0)
        if not self.warmup_ratio < 1:
            raise InputError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check_real("max_grad_norm", self.max_grad_norm, minimum=0.0, open_minimum=True)
        check_real("weight_decay", self.weight_decay, minimum=0.0)
        check_real("loss_decay", self.loss_decay, minimum=0.0, maximum=1.0, open_minimum=True)
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise InputError(f"compute_dtype must be bfloat16 or float32, got {self.compute_dtype!r}")


def make_optimizer(cfg: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, learning-rate schedule: step -> rate): clip, then AdamW on a warmup-cosine schedule."""
    warmup = int(cfg.warmup_ratio * total_steps)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup_steps=warmup,
                                                  decay_steps=max(total_steps, warmup + 1), end_value=0.0)
    if warmup == 0:
        schedule = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps=max(total_steps, 1))
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay))
    return tx, schedule


class DraftParts:
    """The draft head split into trainable parameters and fixed buffers, as plain dicts.

    Plain nested dicts of arrays are what the optimizer and orbax handle
    best; :meth:`merge` rebuilds the NNX module from them inside jit (the
    templates hold only shapes, so no weights are captured as constants).
    """

    def __init__(self, head: Eagle3DraftHead):
        self.graphdef, params, buffers = nnx.split(head, nnx.Param, ...)
        shape_of = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
        self._params = jax.tree.map(shape_of, params)
        self._buffers = jax.tree.map(shape_of, buffers)
        self.initial = (params.to_pure_dict(), buffers.to_pure_dict())

    def merge(self, params: dict, buffers: dict) -> Eagle3DraftHead:
        """The head with these parameters and buffers (nested dicts of arrays, as :attr:`initial`)."""
        p, b = jax.tree.map(lambda x: x, self._params), jax.tree.map(lambda x: x, self._buffers)
        nnx.replace_by_pure_dict(p, params)
        nnx.replace_by_pure_dict(b, buffers)
        return nnx.merge(self.graphdef, p, b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a resumed run needs, as one pytree.

    Attributes:
      params: the draft's trainable parameters (float32 master copy), a nested dict.
      buffers: the head's fixed buffers (``d2t``, ``t2d``).
      opt_state: the optimizer state.
      step: [] int32 optimizer steps taken.
      rng: [2] uint32 PRNG key data, split every step (nothing in the default
        objective consumes randomness, but a resumed run continues the stream).
    """

    params: dict
    buffers: dict
    opt_state: tuple
    step: jax.Array
    rng: jax.Array


def data_fingerprint(batcher: Batcher) -> str:
    """A hash of the tokenized data and its batching, checked on resume."""
    h = hashlib.sha1()
    for ex in batcher.examples:
        h.update(np.asarray(ex.tokens, np.int32).tobytes())
        h.update(np.asarray(ex.loss_mask, np.int8).tobytes())
    h.update(str((batcher.batch_size, batcher.buckets, batcher.seed)).encode())
    return h.hexdigest()


def _as_json(value):
    """``value`` as JSON gives it back (tuples become lists), for comparing with saved metadata."""
    return json.loads(json.dumps(value))


def _cast(tree, dtype):
    """``tree`` with its floating-point leaves cast to ``dtype`` (integer leaves as they are)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def train_step(tx, parts: DraftParts, target_graph, cfg: TrainConfig, layers: tuple[int, ...], state: TrainState,
               batch: dict, target_weights, stored=None) -> tuple[TrainState, dict]:
    """One optimizer step (jitted by :class:`Trainer` with everything before ``state`` bound).

    Args:
      tx: the optax transformation (:func:`make_optimizer`).
      parts: the head's structure (:class:`DraftParts`).
      target_graph: the frozen target's ``nnx.GraphDef``.
      cfg: the run's knobs (``ttt_length``, ``loss_decay``, ``compute_dtype``).
      layers: the target layers whose hidden states feed the head.
      state: the train state before the step (donated).
      batch: ``tokens`` [batch, seq] int32, ``loss_mask`` [batch, seq] int32, ``valid`` [batch, seq] bool.
      target_weights: the frozen target's ``nnx.State``.
      stored: (features [batch, seq, layers * hidden], final hidden [batch, seq, hidden], full-vocabulary
        argmax [batch, seq] int32) when the teacher was precomputed; None runs the target.

    Returns:
      (the state after the step, metrics): :func:`ttt_loss`'s per-step metrics (``loss``, ``kl``, ``acc``,
      ``correct``, ``counted``: [ttt_length]), ``total`` [] the weighted loss, ``grad_norm`` [] before
      clipping, ``tokens`` [] the valid tokens.
    """
    target = nnx.merge(target_graph, target_weights)
    d2t, t2d = state.buffers["d2t"], state.buffers["t2d"]
    draft_ids = jnp.arange(d2t.shape[0], dtype=jnp.int32) + d2t
    tokens, loss_mask, valid = batch["tokens"], batch["loss_mask"], batch["valid"]
    if stored is None:
        teacher = run_target(target, tokens, loss_mask, valid, draft_ids, t2d, layers)
    else:
        features, hidden, target_ids = stored
        draft_logits = target.unembed(hidden.astype(target.dtype), ids=draft_ids)
        teacher = jax.tree.map(jax.lax.stop_gradient, teacher_from_draft_logits(
            tokens, features, draft_logits, target_ids, loss_mask, valid, t2d))
    compute = jnp.dtype(cfg.compute_dtype)

    def loss_fn(params):
        head = parts.merge(_cast(params, compute), state.buffers)
        return ttt_loss(head, teacher, target.embed, cfg.ttt_length, cfg.loss_decay)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    metrics = dict(metrics, total=loss, grad_norm=optax.global_norm(grads), tokens=jnp.sum(valid))
    return TrainState(params=params, buffers=state.buffers, opt_state=opt_state, step=state.step + 1, rng=rng), metrics


class Trainer:
    """Trains a draft head against a frozen target on a :class:`Batcher`'s batches.

    Args:
      target: the frozen target.
      head: the head to train (its vocabulary map must already be set).
      batcher: the data.
      cfg: the run's knobs.
      workdir: checkpoints go to ``workdir/checkpoints``, metrics to
        ``workdir/metrics.jsonl``.
      mesh: a ``(data, tensor)`` mesh (``eagle3_jax.sharding.make_mesh``; None: one device).
      teacher_store: a :class:`eagle3_jax.training.offline.TeacherStore` of
        precomputed target outputs (None: run the target online).
    """

    def __init__(self, target: TargetModel, head: Eagle3DraftHead, batcher: Batcher, cfg: TrainConfig,
                 workdir: str, *, mesh: Mesh | None = None, teacher_store=None):
        head.config.check_target(target.config)
        self.cfg, self.batcher, self.workdir = cfg, batcher, os.path.abspath(workdir)
        self.mesh = mesh = check_mesh(mesh)
        devices = mesh.shape[DATA] if mesh is not None else 1
        if cfg.batch_size % devices:
            raise InputError(f"batch_size {cfg.batch_size} is not a multiple of the {devices} data-parallel devices")
        if batcher.batch_size != cfg.batch_size:
            raise InputError("the batcher's batch size differs from the config's")
        self.teacher_store = teacher_store
        if mesh is not None:  # the frozen target tensor-parallel (sharded as for inference), the head replicated
            target = place_target(target, ShardingPlan.for_target(mesh, target.config))
        self.target_graph, self.target_weights = nnx.split(target)
        self.parts = DraftParts(head)
        self.head_config = head.config
        self.layers = head.config.feature_layers(target.config)
        self.batches_per_epoch = len(batcher)
        self.total_steps = cfg.max_steps or cfg.epochs * self.batches_per_epoch
        self.tx, self.schedule = make_optimizer(cfg, self.total_steps)
        params, buffers = self.parts.initial
        params = _cast(params, jnp.float32)
        self.state = TrainState(params=params, buffers=buffers, opt_state=self.tx.init(params),
                                step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(cfg.seed)))
        self.position = (0, 0)  # (epoch, batch index) of the next batch
        self.fingerprint = data_fingerprint(batcher)
        step = functools.partial(train_step, self.tx, self.parts, self.target_graph, cfg, self.layers)
        self._step = jax.jit(step, donate_argnums=(0,))
        if mesh is not None:
            self._batch_sharding = NamedSharding(mesh, PartitionSpec(DATA))
            self.state = put_tree(self.state, NamedSharding(mesh, PartitionSpec()))
        self.checkpoints = CheckpointStore(self.workdir, cfg.keep_checkpoints)

    @property
    def step(self) -> int:
        """Steps taken so far."""
        return int(to_host(self.state.step))

    def _on_mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # ------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> str:
        """``workdir/checkpoints``."""
        return self.checkpoints.directory

    def save(self) -> None:
        """Saves a checkpoint of the current step (nothing if that step is saved already)."""
        meta = {"epoch": self.position[0], "position": self.position[1], "fingerprint": self.fingerprint,
                "config": dataclasses.asdict(self.cfg), "head": _as_json(dataclasses.asdict(self.head_config))}
        self.checkpoints.save(self.state, meta)

    def _check_meta(self, meta: dict) -> None:
        """Refuses (InputError) a checkpoint made with other data or other shape knobs than this run's."""
        if meta.get("fingerprint") != self.fingerprint:
            raise InputError(f"{self.workdir}: the checkpoint was made with other data or batching; "
                             "resume with the same data, batch size and seed, or start a new run directory")
        shape_knobs = ("ttt_length", "batch_size", "max_length", "seed")
        changed = [k for k in shape_knobs if meta["config"].get(k) != getattr(self.cfg, k)]
        if changed:
            raise InputError(f"{self.workdir}: the checkpoint was made with other {', '.join(changed)}")
        saved_head = meta.get("head")  # absent in checkpoints of older versions
        if isinstance(saved_head, dict):
            ours = _as_json(dataclasses.asdict(self.head_config))
            differ = sorted(k for k in set(ours) | set(saved_head) if ours.get(k) != saved_head.get(k))
            if differ:
                names = ", ".join("feature layers (aux_layer_ids)" if k == "aux_layer_ids" else k for k in differ)
                raise InputError(f"{self.workdir}: the checkpoint was made for a head with other {names}; resume "
                                 "with the same --draft-vocab-size, --feature-layers and --init-head, or start a "
                                 "new run directory")

    def restore_latest(self) -> bool:
        """Restores the newest readable checkpoint of ``workdir``; False if there is none at all.

        Unreadable checkpoints are skipped with a warning and moved aside
        (:meth:`CheckpointStore.restore_latest`). Raises CheckpointError when
        checkpoints exist but none can be read, and InputError when the one
        found was made with other data, other shape knobs or another head.
        """
        found = self.checkpoints.restore_latest(self.state, self._check_meta)
        if found is None:
            return False
        self.state, meta = found
        self.position = (int(meta["epoch"]), int(meta["position"]))
        return True

    # --------------------------------------------------------------- training

    def _next_batch(self) -> tuple[Batch, list]:
        epoch, position = self.position
        bucket, idx = self.batcher.plan(epoch)[position]
        rows = [self.batcher.examples[i] for i in idx]
        batch = self.batcher.collate(bucket, rows)
        stored = self.teacher_store.batch(idx, bucket, self.cfg.batch_size) if self.teacher_store else None
        position += 1
        if position >= self.batches_per_epoch:
            epoch, position = epoch + 1, 0
        self.position = (epoch, position)
        return batch, stored

    def _device(self, x):
        return put(x, self._batch_sharding) if self.mesh is not None else jnp.asarray(x)

    def run(self, *, progress: bool = True, log_path: str | None = None,
            on_step: Callable[[int, dict], None] | None = None, stop_after: int | None = None) -> list[dict]:
        """Trains until ``total_steps`` (or ``stop_after`` more steps), saving every ``save_every`` steps.

        Returns the metrics of the steps run (also appended to ``log_path`` as JSONL).
        """
        history = []
        start = self.step
        end = self.total_steps if stop_after is None else min(self.total_steps, start + stop_after)
        if log_path:
            truncate_log(log_path, start)
        log = open(log_path, "a", encoding="utf-8") if log_path else None
        bar = tqdm(total=self.total_steps, initial=start, desc="training", unit="step", disable=not progress)
        try:
            while self.step < end:
                epoch = self.position[0]
                batch, stored = self._next_batch()
                arrays = {k: self._device(getattr(batch, k)) for k in ("tokens", "loss_mask", "valid")}
                stored = None if stored is None else tuple(self._device(s) for s in stored)
                t0 = time.perf_counter()
                with self._on_mesh():
                    self.state, metrics = self._step(self.state, arrays, self.target_weights, stored)
                metrics = to_host(metrics)
                seconds = time.perf_counter() - t0
                step = self.step
                row = {"step": step, "epoch": epoch, "loss": float(metrics["total"]),
                       "loss_steps": [float(x) for x in metrics["loss"]],
                       "kl_steps": [float(x) for x in metrics["kl"]],
                       "acc_steps": [float(x) for x in metrics["acc"]],
                       "lr": float(self.schedule(step - 1)), "grad_norm": float(metrics["grad_norm"]),
                       "tokens_per_second": float(metrics["tokens"]) / seconds}
                history.append(row)
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc0=f"{row['acc_steps'][0]:.2f}")
                bar.update(1)
                if on_step is not None:
                    on_step(step, row)
                if step % self.cfg.save_every == 0 or step == self.total_steps:
                    self.save()
        finally:
            bar.close()
            if log:
                log.close()
        return history

    def head(self) -> Eagle3DraftHead:
        """The head with the current (float32) parameters."""
        params, buffers = to_host((self.state.params, self.state.buffers))
        return self.parts.merge(params, buffers)
