"""The portable live-length backend: the committed prefix in blocks, then the window
(docs/architecture.md#attention).

Writes the new K/V in place, attends over the prefix with a loop over
``PREFIX_BLOCK``-slot blocks that stops at the longest live row of the batch
(online softmax), over the window with the forward's local mask, and merges
the two by their log-sum-exp (``attention/partial.py``). Its cost follows the
live length, not the capacity; plain ``jax.numpy`` and ``lax``, so it runs
on CPU, GPU and TPU, and it is the default where no kernel is chosen.
A gradient through it takes the dense prefix's VJP (``partial.with_dense_gradient``).
"""

from __future__ import annotations

import functools

import jax

from eagle3_jax.attention.metadata import AttentionMetadata
from eagle3_jax.attention.partial import live_length_attention, prefix_blocks
from eagle3_jax.kv_cache import KVCache

# Slots per prefix block: large enough that the loop's per-trip cost is small next to its dots,
# small enough that a short prefix reads little past its end.
PREFIX_BLOCK = 512


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, layer: int,
                        meta: AttentionMetadata) -> tuple[jax.Array, KVCache]:
    """Writes ``k``/``v`` [batch, T, kv_heads, head_dim] at ``meta.slots`` of ``layer``, then attends
    ``q`` [batch, T, q_heads, head_dim] over the prefix (in blocks) and the window."""
    return live_length_attention(functools.partial(prefix_blocks, block=PREFIX_BLOCK), q, k, v, cache, layer, meta)
