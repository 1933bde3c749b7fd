"""The reference attention backend: write the new K/V, then score every slot
of the buffer through the dense mask (docs/architecture.md#attention).

Its cost follows the capacity, not the live length; it is the definition the
other backends are tested against (``tests/test_attention_backends.py``).
Numerics follow HF: scores and softmax in float32, scale ``head_dim ** -0.5``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eagle3_jax.attention.metadata import AttentionMetadata
from eagle3_jax.attention.partial import MASK_VALUE
from eagle3_jax.kv_cache import KVCache


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax attention with grouped KV heads.

    Args:
      q: [batch, seq, q_heads, head_dim] queries (already rotated).
      k, v: [batch, kv_heads, kv_len, head_dim]; q_heads is a multiple of kv_heads.
      mask: [batch, seq, kv_len] bool, True where a query may attend.
    Returns:
      [batch, seq, q_heads, head_dim] in q's dtype.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(q.dtype))
    return out.reshape(b, t, hq, d)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, layer: int,
                        meta: AttentionMetadata) -> tuple[jax.Array, KVCache]:
    """Writes ``k``/``v`` [batch, T, kv_heads, head_dim] at ``meta.slots`` of ``layer``, then attends
    ``q`` [batch, T, q_heads, head_dim] over the whole buffer through ``meta.dense_mask``."""
    cache = cache.write(layer, k, v, meta.slots)
    out = grouped_attention(q, cache.k[layer], cache.v[layer], meta.dense_mask(cache.capacity))
    return out, cache
