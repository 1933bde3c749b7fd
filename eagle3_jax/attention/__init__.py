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
              the live length; portable; the default on CPU).
  pallas_gpu  as blockwise, with the prefix through JAX's Pallas GPU
              decode-attention kernel (the default on GPUs of compute
              capability 8.0 and newer; Pallas interpret mode elsewhere,
              which is how the tests run it).
  pallas_tpu  as blockwise, with the prefix through this project's Pallas TPU
              flash-decoding kernel (the default on TPU; interpret mode
              elsewhere).
  auto        not a backend of its own: the platform's default, resolved
              when the forward is traced (:func:`resolve_backend`).

On a device mesh every backend runs per shard (``attention/sharded.py``).

A new backend is a function ``(q, k, v, cache, layer, meta) -> (out, cache)``
added with :func:`register_backend`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import jax

from eagle3_jax.attention.blockwise import blockwise_attention
from eagle3_jax.attention.metadata import DEFAULT_BACKEND, AttentionMetadata
from eagle3_jax.attention.pallas_gpu import pallas_gpu_attention
from eagle3_jax.attention.pallas_tpu import pallas_tpu_attention
from eagle3_jax.attention.reference import MASK_VALUE, grouped_attention, reference_attention
from eagle3_jax.attention.sharded import sharded_attention
from eagle3_jax.axes import current_mesh
from eagle3_jax.errors import InputError
from eagle3_jax.kv_cache import KVCache
from eagle3_jax.platform import executes_here, target_platform

Backend = Callable[[jax.Array, jax.Array, jax.Array, KVCache, int, AttentionMetadata],
                   tuple[jax.Array, KVCache]]

BACKENDS: dict[str, Backend] = {"reference": reference_attention, "blockwise": blockwise_attention,
                                "pallas_gpu": pallas_gpu_attention, "pallas_tpu": pallas_tpu_attention}

# What "auto" means on each platform (eagle3_jax.platform.target_platform()); anything else gets "blockwise".
PLATFORM_DEFAULTS = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}
# The Pallas GPU kernel is compiled by Triton for compute capability 8.0 (Ampere) and newer.
MIN_PALLAS_GPU_CAPABILITY = (8, 0)


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
    (:data:`PLATFORM_DEFAULTS` of :func:`~eagle3_jax.platform.target_platform`, else "blockwise";
    on a GPU the kernel cannot compile for, "blockwise"); a known name is itself."""
    if check_backend(name) == "auto":
        backend = PLATFORM_DEFAULTS.get(target_platform(), "blockwise")
        if backend == "pallas_gpu" and not pallas_gpu_supported():
            return "blockwise"
        return backend
    return name


@functools.cache
def pallas_gpu_supported() -> bool:
    """Whether this process's GPU can compile the Pallas GPU kernel (compute capability 8.0 or
    newer); says once, on stderr, when it cannot and ``auto`` falls back to ``blockwise``. True
    where no GPU can be asked (compiling ahead of time for one)."""
    if not executes_here():
        return True
    capability = gpu_capability(jax.devices()[0])
    if capability is None or capability >= MIN_PALLAS_GPU_CAPABILITY:
        return True
    kind = getattr(jax.devices()[0], "device_kind", "this GPU")
    print(f"note: {kind} (compute capability {capability[0]}.{capability[1]}) cannot compile the Pallas GPU "
          f"attention kernel (it needs {MIN_PALLAS_GPU_CAPABILITY[0]}.{MIN_PALLAS_GPU_CAPABILITY[1]}); attention "
          "'auto' uses 'blockwise'", file=sys.stderr)
    return False


def gpu_capability(device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device, None if it does not say."""
    text = str(getattr(device, "compute_capability", "") or "")
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


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
           "blockwise_attention", "check_backend", "gpu_capability", "grouped_attention", "pallas_gpu_attention",
           "pallas_gpu_supported", "pallas_tpu_attention", "reference_attention", "register_backend", "resolve_backend"]
