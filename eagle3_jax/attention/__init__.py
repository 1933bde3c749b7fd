"""One attention contract for every forward (docs/architecture.md#attention).

A model layer calls :func:`attend` with its rotated queries, the new keys and
values, the KV cache and the :class:`AttentionMetadata` of the forward. The
backend named by ``meta.backend`` (a static string) writes the new K/V and
attends; every backend computes the same function, checked against
``reference`` by ``tests/test_attention_backends.py`` (prefill chunks, decode,
tree verification, the draft head's tree steps).

Backends:
  reference   write, then dense masked attention over the whole buffer
              (cost follows the capacity; portable; the definition).
  blockwise   write, then the committed prefix in blocks up to the longest
              live row plus the window, merged by log-sum-exp (cost follows
              the live length; portable; the default on CPU and TPU).
  pallas_gpu  as blockwise, with the prefix through JAX's Pallas GPU
              decode-attention kernel (the default on GPU; Pallas interpret
              mode elsewhere, which is how the tests run it).
  auto        not a backend of its own: the platform's default, resolved
              when the forward is traced (:func:`resolve_backend`).

On a device mesh every backend runs per shard (``attention/sharded.py``).

A new backend is a function ``(q, k, v, cache, layer, meta) -> (out, cache)``
added with :func:`register_backend`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from eagle3_jax.attention.blockwise import blockwise_attention
from eagle3_jax.attention.metadata import DEFAULT_BACKEND, AttentionMetadata
from eagle3_jax.attention.pallas_gpu import pallas_gpu_attention
from eagle3_jax.attention.reference import MASK_VALUE, grouped_attention, reference_attention
from eagle3_jax.attention.sharded import sharded_attention
from eagle3_jax.errors import InputError
from eagle3_jax.kv_cache import KVCache
from eagle3_jax.sharding import current_mesh

Backend = Callable[[jax.Array, jax.Array, jax.Array, KVCache, int, AttentionMetadata],
                   tuple[jax.Array, KVCache]]

BACKENDS: dict[str, Backend] = {"reference": reference_attention, "blockwise": blockwise_attention,
                                "pallas_gpu": pallas_gpu_attention}

# What "auto" means on each platform (jax.default_backend()); anything else gets "blockwise".
PLATFORM_DEFAULTS = {"gpu": "pallas_gpu", "cuda": "pallas_gpu"}


def register_backend(name: str, fn: Backend) -> None:
    """Makes ``fn`` selectable as ``backend=name``."""
    BACKENDS[name] = fn


def check_backend(name: str) -> str:
    """``name`` if it is a known backend or "auto", else an InputError listing them."""
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise InputError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(sorted(BACKENDS))}")
    return name


def resolve_backend(name: str) -> str:
    """The backend ``name`` stands for here: "auto" is the platform's default
    (:data:`PLATFORM_DEFAULTS`, else "blockwise"); a known name is itself."""
    if check_backend(name) == "auto":
        return PLATFORM_DEFAULTS.get(jax.default_backend(), "blockwise")
    return name


def attend(q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, layer: int,
           meta: AttentionMetadata) -> tuple[jax.Array, KVCache]:
    """Writes the new K/V of ``layer`` and attends, with the backend ``meta.backend``.

    Args:
      q: [batch, T, q_heads, head_dim] rotated queries.
      k, v: [batch, T, kv_heads, head_dim] the new tokens' keys (rotated) and values.
      cache: the KV cache (``lengths`` unchanged here).
      layer: static layer index.
      meta: the forward's attention metadata.
    Returns:
      ([batch, T, q_heads, head_dim] in q's dtype, the cache with the K/V written).

    On a device mesh (``jax.set_mesh``) the backend runs per shard of the
    cache's rows and KV heads (:func:`~eagle3_jax.attention.sharded.sharded_attention`).
    """
    backend = BACKENDS[resolve_backend(meta.backend)]
    mesh = current_mesh()
    if mesh is not None and mesh.size > 1:
        return sharded_attention(backend, mesh, q, k, v, cache, layer, meta)
    return backend(q, k, v, cache, layer, meta)


__all__ = ["AttentionMetadata", "BACKENDS", "DEFAULT_BACKEND", "MASK_VALUE", "PLATFORM_DEFAULTS", "attend",
           "blockwise_attention", "check_backend", "grouped_attention", "pallas_gpu_attention", "reference_attention",
           "register_backend", "resolve_backend"]
