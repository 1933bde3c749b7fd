"""Precomputed teacher outputs: run the frozen target once, train from disk.

For each example the store keeps the target's features [T, 3H], its
final-normed hidden states [T, H] (in the target's dtype) and the argmax of
its logits over the whole vocabulary [T] in one safetensors file; a training
step then only applies the draft vocabulary's rows of the target's output
layer to the stored hidden states. This trades disk (about 4H values per
token) for a target forward per step, which pays off over several epochs.

Building a store can take hours on a CPU (SmolLM2-135M over 1.6 M tokens),
so it resumes. The examples go through the target in a fixed plan of
batches (grouped by training's length buckets,
``training.data.buckets_for``, about :data:`TOKENS_PER_FORWARD` tokens
each), and each example's file is written to a work directory
``.NAME.building`` beside the store, under a temporary name renamed when
complete. That directory's ``build.json`` records what it is being built
for (data fingerprint, feature layers, example count); a build that finds a
work directory made for the same store skips every batch whose files are all
there, one made for anything else is removed and started afresh. When every
file is there the store is assembled atomically (``eagle3_jax.atomic``:
hard links to the files in a temporary sibling, index last, one rename) and
the work directory removed. A store whose files went missing later is
refused as incomplete. Callers keep one builder per store at a time (a
training run holds its run directory's lock).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from eagle3_jax.atomic import atomic_directory, check_destination, rename_noreplace
from eagle3_jax.errors import CheckpointError
from eagle3_jax.models.target import TargetModel
from eagle3_jax.training.checkpoints import warn
from eagle3_jax.training.data import Example, buckets_for, group_by_bucket
from eagle3_jax.weights.safetensors_io import SafetensorsFile, save_file

INDEX = "teacher_index.json"
BUILD = "build.json"  # in the work directory of a build in progress
BUILD_FORMAT = "eagle3-jax teacher build"
VERSION = 2  # 2: with the argmax of every position (a store of version 1 has none, and is computed again)
TOKENS_PER_FORWARD = 2048  # rows x bucket length of one forward while building (a batch of short examples)


def _file(directory: str, i: int) -> str:
    return os.path.join(directory, f"{i:08d}.safetensors")


def _rows_per_forward(bucket: int) -> int:
    return max(1, TOKENS_PER_FORWARD // bucket)


def forward_plan(lengths: Sequence[int], max_length: int) -> list[tuple[list[int], int]]:
    """The build's batches: (example indices, bucket length), by bucket, in example order within a bucket.

    A batch holds up to ``TOKENS_PER_FORWARD // bucket`` examples (the last
    of a bucket is padded with empty rows), so each bucket compiles once. The
    plan depends only on the lengths: a resumed build recomputes a batch
    exactly as the stopped one would have.
    """
    by_bucket = group_by_bucket(lengths, buckets_for(max_length))
    plan = []
    for bucket in sorted(by_bucket):
        rows, per = by_bucket[bucket], _rows_per_forward(bucket)
        plan += [(rows[s:s + per], bucket) for s in range(0, len(rows), per)]
    return plan


def _save_atomically(tensors: dict[str, np.ndarray], path: str) -> None:
    """A file that exists is complete: written under a temporary name, then renamed."""
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)


def _work_directory(directory: str, spec: dict) -> str:
    """The work directory ``.NAME.building`` of ``directory``'s build: resumed if made for ``spec``, else new.

    A work directory made for other data, layers or count is removed (with a
    warning); a path of that name that is not a build's work directory is
    never touched (CheckpointError).
    """
    parent, name = os.path.split(directory)
    work = os.path.join(parent, f".{name}.building")
    if os.path.lexists(work):
        try:
            with open(os.path.join(work, BUILD), encoding="utf-8") as f:
                found = json.load(f)
        except (OSError, ValueError):
            found = None
        if os.path.islink(work) or not isinstance(found, dict) or found.get("format") != BUILD_FORMAT:
            raise CheckpointError(f"{work} is in the way of the teacher store's build and is not one; "
                                  "move or remove it")
        if found == spec:
            return work
        warn(f"{work}: a stopped teacher build for other data or feature layers; starting afresh")
        shutil.rmtree(work)
    os.makedirs(parent, exist_ok=True)
    fresh = tempfile.mkdtemp(prefix=f".{name}.building-", dir=parent)
    with open(os.path.join(fresh, BUILD), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    rename_noreplace(fresh, work)
    return work


def is_teacher_store(path: str) -> bool:
    """Whether ``path`` is a directory that :meth:`TeacherStore.build` wrote (it holds the index)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX))


class TeacherStore:
    """Per-example target outputs on disk; :meth:`batch` assembles a padded batch.

    Opening a store checks its index, its fingerprint (when given) and that
    every example's file is there; a store that fails is a CheckpointError.
    """

    def __init__(self, directory: str, fingerprint: str | None = None):
        path = os.path.join(directory, INDEX)
        try:
            with open(path, encoding="utf-8") as f:
                self.index = json.load(f)
        except (OSError, ValueError):
            raise CheckpointError(f"{directory}: not a teacher store (no readable {INDEX})") from None
        count = self.index.get("count") if isinstance(self.index, dict) else None
        if not isinstance(count, int) or count < 0:
            raise CheckpointError(f"{directory}: the teacher store's {INDEX} is malformed (no example count)")
        if self.index.get("version", 1) != VERSION:
            raise CheckpointError(f"{directory}: the teacher store was written by another version of eagle3-jax "
                                  f"(store format {self.index.get('version', 1)}, not {VERSION})")
        if fingerprint is not None and self.index.get("fingerprint") != fingerprint:
            raise CheckpointError(f"{directory}: the teacher store was computed for other data")
        missing = [i for i in range(count) if not os.path.isfile(_file(directory, i))]
        if missing:
            raise CheckpointError(f"{directory}: the teacher store is incomplete ({len(missing)} of {count} example "
                                  f"files missing, first {os.path.basename(_file(directory, missing[0]))})")
        self.directory = directory

    @classmethod
    def build(cls, target: TargetModel, examples: Sequence[Example], directory: str,
              feature_layers: tuple[int, ...], fingerprint: str, max_length: int, progress: bool = True,
              overwrite: bool = False) -> TeacherStore:
        """Runs the target over every example and writes the store (see the module's docstring).

        Resumes a build of the same store (same data fingerprint, feature
        layers and example count) that was stopped; an existing ``directory``
        is replaced only with ``overwrite`` and only if it is a teacher store
        (:func:`is_teacher_store`).
        """
        directory = check_destination(directory, overwrite=overwrite, replaceable=is_teacher_store,
                                      what="teacher store")
        spec = {"format": BUILD_FORMAT, "version": VERSION, "fingerprint": fingerprint,
                "feature_layers": list(feature_layers), "count": len(examples)}
        work = _work_directory(directory, spec)
        graph, weights = nnx.split(target)

        @jax.jit
        def forward(weights, tokens):
            model = nnx.merge(graph, weights)
            out = model.forward_sequence(tokens, feature_layers=feature_layers,
                                         logits_indices=jnp.zeros((tokens.shape[0], 0), jnp.int32), return_hidden=True)
            return out.features, out.hidden, jnp.argmax(model.unembed(out.hidden), axis=-1).astype(jnp.int32)

        plan = forward_plan([len(ex.tokens) for ex in examples], max_length)
        finished = {i for i in range(len(examples)) if os.path.isfile(_file(work, i))}  # by the stopped build
        with tqdm(total=len(examples), initial=len(finished), desc="precomputing teacher", unit="seq",
                  disable=not progress) as bar:
            for rows, bucket in plan:
                if finished.issuperset(rows):
                    continue
                tokens = np.zeros((_rows_per_forward(bucket), bucket), np.int32)
                for r, i in enumerate(rows):
                    tokens[r, : len(examples[i].tokens)] = examples[i].tokens
                features, hidden, argmax = jax.device_get(forward(weights, jnp.asarray(tokens)))
                for r, i in enumerate(rows):
                    n = len(examples[i].tokens)
                    _save_atomically({"features": np.asarray(features[r, :n]), "hidden": np.asarray(hidden[r, :n]),
                                      "argmax": np.asarray(argmax[r, :n])}, _file(work, i))
                bar.update(len(set(rows) - finished))
        with atomic_directory(directory, overwrite=overwrite, replaceable=is_teacher_store,
                              what="teacher store") as tmp:
            for i in range(len(examples)):
                os.link(_file(work, i), _file(tmp, i))
            with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
                json.dump({"version": VERSION, "count": len(examples), "fingerprint": fingerprint,
                           "feature_layers": list(feature_layers)}, f)
        shutil.rmtree(work, ignore_errors=True)
        return cls(directory, fingerprint)

    def batch(self, indices: Sequence[int], length: int, batch_size: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features [batch, length, 3H], hidden [batch, length, H], argmax [batch, length] int32), zero-padded."""
        rows = [SafetensorsFile(_file(self.directory, i)) for i in indices]
        rows = [(f.read("features"), f.read("hidden"), f.read("argmax")) for f in rows]
        f0, h0, _ = rows[0]
        features = np.zeros((batch_size, length, f0.shape[-1]), f0.dtype)
        hidden = np.zeros((batch_size, length, h0.shape[-1]), h0.dtype)
        argmax = np.zeros((batch_size, length), np.int32)
        for r, (feat, hid, top) in enumerate(rows):
            features[r, : len(feat)], hidden[r, : len(hid)], argmax[r, : len(top)] = feat, hid, top
        return features, hidden, argmax
