"""What decoding and training need from a target model: the :class:`TargetModel` protocol.

Decoding (``eagle3_jax/decoding``), training and evaluation use a target only
through this surface, so a new architecture is a module that implements it
plus a registry entry (``eagle3_jax/models/registry.py``): its config parser,
its module class and its weight-name rules. The shared implementation,
:class:`eagle3_jax.models.transformer.DecoderLM`, serves Qwen3, Qwen2 and Llama.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import jax

from eagle3_jax.attention import AttentionMetadata
from eagle3_jax.config import TargetConfig
from eagle3_jax.kv_cache import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    """What one target forward returns.

    Attributes:
      logits: [batch, rows, vocab] float32, for every input position (rows =
        seq) or only the positions asked for with ``logits_indices``; None when
        ``logits_indices`` has zero rows.
      cache: the cache with the new tokens' K/V written (lengths unchanged).
      features: [batch, seq, len(feature_layers) * hidden] hidden states at the
        inputs of the requested layers, concatenated in the order asked; None
        when no layers were requested.
      hidden: [batch, seq, hidden] the final-normed hidden states of every
        position, whatever ``logits_indices`` selects (only with
        ``return_hidden``; what offline training stores).
    """

    logits: jax.Array | None
    cache: KVCache
    features: jax.Array | None
    hidden: jax.Array | None = None


@runtime_checkable
class TargetModel(Protocol):
    """A causal LM that EAGLE-3 can speculate for (docs/architecture.md#forward-contract).

    Attributes:
      config: its :class:`~eagle3_jax.config.TargetConfig` (vocabulary, layer
        count, KV heads and head_dim for the cache, eos ids, feature layers).
    """

    config: TargetConfig

    @property
    def dtype(self): ...

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token ids [...] -> embeddings [..., hidden] (shared with the draft head)."""

    def unembed(self, hidden: jax.Array, ids: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden [..., hidden] -> float32 logits [..., vocab] (only the entries ``ids`` [n]: [..., n])."""

    def __call__(self, tokens: jax.Array, cache: KVCache, attention: AttentionMetadata, *,
                 feature_layers: tuple[int, ...] = (), logits_indices: jax.Array | None = None,
                 return_hidden: bool = False) -> ForwardOutput:
        """One forward of new tokens [batch, T] against the cache (see DecoderLM.__call__)."""

    def forward_sequence(self, tokens: jax.Array, valid: jax.Array | None = None, **kwargs) -> ForwardOutput:
        """A forward over whole sequences from position 0 with a fresh cache of their length."""


def new_cache(config: TargetConfig, batch: int, capacity: int, dtype) -> KVCache:
    """An empty KV cache shaped for ``config``'s layers and KV heads."""
    return KVCache.create(num_layers=config.num_hidden_layers, batch=batch, capacity=capacity,
                          kv_heads=config.num_key_value_heads, head_dim=config.head_dim, dtype=dtype)
