"""Precomputed teacher outputs: run the frozen target once, train from disk.

For each example the store keeps the target's features [T, 3H] and its
final-normed hidden states [T, H] (in the target's dtype) in one
safetensors file; a training step then only applies the target's output
head to the stored hidden states. This trades disk (about 4H values per
token) for a target forward per step, which pays off over several epochs.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from eagle3_jax.atomic import atomic_directory
from eagle3_jax.errors import CheckpointError
from eagle3_jax.models.qwen3 import Qwen3ForCausalLM
from eagle3_jax.training.data import Example, buckets_for
from eagle3_jax.weights.safetensors_io import SafetensorsFile, save_file

INDEX = "teacher_index.json"


def _file(directory: str, i: int) -> str:
    return os.path.join(directory, f"{i:08d}.safetensors")


class TeacherStore:
    """Per-example target outputs on disk; :meth:`batch` assembles a padded batch."""

    def __init__(self, directory: str, fingerprint: str | None = None):
        path = os.path.join(directory, INDEX)
        try:
            with open(path, encoding="utf-8") as f:
                self.index = json.load(f)
        except (OSError, ValueError):
            raise CheckpointError(f"{directory}: not a teacher store (no readable {INDEX})") from None
        if fingerprint is not None and self.index.get("fingerprint") != fingerprint:
            raise CheckpointError(f"{directory}: the teacher store was computed for other data")
        self.directory = directory

    @classmethod
    def build(cls, target: Qwen3ForCausalLM, examples: Sequence[Example], directory: str,
              feature_layers: tuple[int, ...], fingerprint: str, max_length: int, progress: bool = True,
              overwrite: bool = False) -> "TeacherStore":
        """Runs the target over every example and writes the store atomically."""
        graph, weights = nnx.split(target)

        @jax.jit
        def forward(weights, tokens):
            out = nnx.merge(graph, weights).forward_sequence(tokens, feature_layers=feature_layers,
                                                             logits_indices=jnp.zeros((1, 0), jnp.int32),
                                                             return_hidden=True)
            return out.features[0], out.hidden[0]

        buckets = buckets_for(max_length)
        replaceable = lambda p: os.path.exists(os.path.join(p, INDEX))
        with atomic_directory(directory, overwrite=overwrite, replaceable=replaceable) as tmp:
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
