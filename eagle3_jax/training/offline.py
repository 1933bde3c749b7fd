"""Precomputed teacher outputs: run the frozen target once, train from disk.

For each example the store keeps the target's features [T, 3H] and its
final-normed hidden states [T, H] (in the target's dtype) in one
safetensors file; a training step then only applies the target's output
head to the stored hidden states. This trades disk (about 4H values per
token) for a target forward per step, which pays off over several epochs.

The store is written atomically: the files go to a hidden temporary sibling
that becomes the store, index last, once every example is done. A build
killed midway therefore leaves no store (only the temporary sibling, which
the next build removes), and a store whose files went missing later is
refused as incomplete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from eagle3_jax.atomic import atomic_directory
from eagle3_jax.errors import CheckpointError
from eagle3_jax.models.target import TargetModel
from eagle3_jax.training.data import Example, buckets_for
from eagle3_jax.weights.safetensors_io import SafetensorsFile, save_file

INDEX = "teacher_index.json"


def _file(directory: str, i: int) -> str:
    return os.path.join(directory, f"{i:08d}.safetensors")


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
        """Runs the target over every example and writes the store atomically (see the module's docstring).

        An existing ``directory`` is replaced only with ``overwrite`` and only
        if it is a teacher store (:func:`is_teacher_store`).
        """
        graph, weights = nnx.split(target)

        @jax.jit
        def forward(weights, tokens):
            out = nnx.merge(graph, weights).forward_sequence(tokens, feature_layers=feature_layers,
                                                             logits_indices=jnp.zeros((1, 0), jnp.int32),
                                                             return_hidden=True)
            return out.features[0], out.hidden[0]

        buckets = buckets_for(max_length)
        with atomic_directory(directory, overwrite=overwrite, replaceable=is_teacher_store,
                              what="teacher store") as tmp:
            for i, ex in enumerate(tqdm(examples, desc="precomputing teacher", unit="seq", disable=not progress)):
                n = len(ex.tokens)
                bucket = next(b for b in buckets if n <= b)
                tokens = np.zeros((1, bucket), np.int32)
                tokens[0, :n] = ex.tokens
                features, hidden = jax.device_get(forward(weights, jnp.asarray(tokens)))
                save_file({"features": np.asarray(features[:n]), "hidden": np.asarray(hidden[:n])}, _file(tmp, i))
            with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
                json.dump({"count": len(examples), "fingerprint": fingerprint,
                           "feature_layers": list(feature_layers)}, f)
        return cls(directory, fingerprint)

    def batch(self, indices: Sequence[int], length: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(features [batch, length, 3H], hidden [batch, length, H]), zero-padded."""
        rows = [SafetensorsFile(_file(self.directory, i)) for i in indices]
        rows = [(f.read("features"), f.read("hidden")) for f in rows]
        f0, h0 = rows[0]
        features = np.zeros((batch_size, length, f0.shape[-1]), f0.dtype)
        hidden = np.zeros((batch_size, length, h0.shape[-1]), h0.dtype)
        for r, (feat, hid) in enumerate(rows):
            features[r, : len(feat)], hidden[r, : len(hid)] = feat, hid
        return features, hidden
