"""A whole training run, from a target and data files to an exported head.

The run directory holds everything a run produces: ``checkpoints/``
(orbax), ``metrics.jsonl`` (one line per step), ``vocab.json`` (the vocabulary
map's coverage), ``teacher/`` (with ``precompute``), ``summary.json`` and,
when training ends, ``head/``, the trained head in the SpecForge/SGLang
format (written atomically).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eagle3_jax.config import Eagle3Config
from eagle3_jax.errors import InputError
from eagle3_jax.hub import resolve_model_dir
from eagle3_jax.loading import load_draft, load_target, save_draft
from eagle3_jax.models.eagle3 import Eagle3DraftHead
from eagle3_jax.training.data import Batcher, load_examples
from eagle3_jax.training.offline import TeacherStore
from eagle3_jax.training.trainer import Trainer, TrainConfig, data_fingerprint
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
      resume: continue the run in ``output`` from its newest checkpoint.
      devices: data-parallel devices (None: all local devices).
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
    dtype: str | None = None
    export_embedding: bool = True


def set_vocab_map(head: Eagle3DraftHead, d2t: np.ndarray, t2d: np.ndarray) -> None:
    head.d2t.value = jnp.asarray(d2t, jnp.int32)
    head.t2d.value = jnp.asarray(t2d, bool)


def new_head(target_config, draft_vocab_size: int, feature_layers, seed: int) -> Eagle3DraftHead:
    cfg = Eagle3Config.for_target(target_config, draft_vocab_size=draft_vocab_size, feature_layers=feature_layers)
    cfg.check_target(target_config, where="the new head")
    return Eagle3DraftHead(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))


def make_mesh(devices: int | None):
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise InputError(f"asked for {n} devices but {len(available)} are available")
    if n == 1:
        return None
    return jax.sharding.Mesh(np.array(available[:n]), ("data",))


def run_training(job: TrainJob, *, progress: bool = True, stop_after: int | None = None) -> dict:
    """Runs (or resumes) a training job; returns its summary (also written to ``summary.json``)."""
    cfg = job.config
    out = os.path.abspath(job.output)
    if os.path.exists(out) and os.listdir(out) and not job.resume:
        raise InputError(f"{out}: the run directory is not empty (pass --resume to continue it)")
    if job.resume and not os.path.isdir(os.path.join(out, "checkpoints")):
        raise InputError(f"{out}: nothing to resume (no checkpoints/)")
    target_dir = resolve_model_dir(job.target)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = load_target(target_dir, dtype=job.dtype, progress=progress)
    examples = load_examples(job.data, tokenizer, cfg.max_length)
    batcher = Batcher(examples, cfg.batch_size, cfg.max_length, cfg.seed)
    os.makedirs(out, exist_ok=True)

    counts = token_counts(examples, target.config.vocab_size)
    if job.init_head:
        head = load_draft(job.init_head, target.config, dtype="float32", progress=progress)
    else:
        head = new_head(target.config, min(job.draft_vocab_size, target.config.vocab_size), job.feature_layers,
                        cfg.seed)
        set_vocab_map(head, *vocab_map(counts, head.config.draft_vocab_size))
    vocab_info = {"draft_vocab_size": head.config.draft_vocab_size,
                  "coverage_of_training_tokens": coverage(counts, np.asarray(head.t2d[...])),
                  "training_tokens": int(counts.sum())}
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab_info, f, indent=2)

    store = None
    if job.precompute:
        store_dir = os.path.join(out, "teacher")
        fingerprint = data_fingerprint(batcher)
        if os.path.exists(store_dir):
            store = TeacherStore(store_dir, fingerprint)
        else:
            store = TeacherStore.build(target, examples, store_dir, head.config.feature_layers(target.config),
                                       fingerprint, cfg.max_length, progress=progress)

    trainer = Trainer(target, head, batcher, cfg, out, mesh=make_mesh(job.devices), teacher_store=store)
    if job.resume and not trainer.restore_latest():
        raise InputError(f"{out}: nothing to resume (no checkpoint saved yet)")
    history = trainer.run(progress=progress, log_path=os.path.join(out, "metrics.jsonl"), stop_after=stop_after)
    finished = int(trainer.state.step) >= trainer.total_steps
    summary = {"steps": int(trainer.state.step), "total_steps": trainer.total_steps, "finished": finished,
               "examples": len(examples), "batches_per_epoch": trainer.batches_per_epoch, **vocab_info,
               "last": history[-1] if history else None, "config": dataclasses.asdict(cfg)}
    if finished:
        embedding = target.model.embed_tokens.embedding[...] if job.export_embedding else None
        summary["head"] = save_draft(trainer.head(), os.path.join(out, "head"), embedding=embedding, overwrite=True)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary
