"""The GPU backend: the committed prefix through JAX's Pallas decode-attention kernel
(docs/architecture.md#attention).

``jax.experimental.pallas.ops.gpu.decode_attention`` attends a block of
queries over one key/value sequence with a per-sequence length, split over
``k_splits`` parts of the sequence that run in parallel, and can return its
softmax residuals (the running maximum and sum) with an unnormalised output:
exactly a :class:`~eagle3_jax.attention.partial.Partial` of the prefix. It is
mapped over the batch and the KV heads of a layer's buffer where it lies
([batch, kv_heads, capacity, head_dim]: one [capacity, head_dim] sequence per
row and KV head, no transpose). All T new tokens of a row share that row's
prefix, so their queries ride together in the kernel's query axis
(``groups * T`` rows per KV head); splits past a row's live length do no
work. The window (the new tokens' own slots, with the causal or tree mask)
is the portable ``window_part``, merged by log-sum-exp.

Off a GPU the kernel runs in Pallas interpret mode (how the backend tests
run it on CPU). Forwards with many new tokens (prefill chunks), caches the
kernel cannot tile, and a JAX without the module (JAX 0.11 deprecates it) go
to the portable block loop instead.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from eagle3_jax.attention.blockwise import PREFIX_BLOCK
from eagle3_jax.attention.metadata import AttentionMetadata
from eagle3_jax.attention.partial import Partial, live_length_attention, prefix_blocks
from eagle3_jax.kv_cache import KVCache

# Query rows (groups * T) per KV head up to which the kernel serves the prefix; more (prefill
# chunks) go to the block loop, whose dots are large enough to use the GPU well.
MAX_KERNEL_ROWS = 512
BLOCK_H = 16  # the kernel's query-row tile (it pads to a multiple)


def kernel_tiling(capacity: int) -> tuple[int, int] | None:
    """(k_splits, block_k) tiling ``capacity`` for the kernel, or None if none does.

    The kernel needs ``capacity = k_splits * n * block_k`` with blocks of at
    least 16 slots. More splits run more programs in parallel for one row
    (what a batch-1 decode needs), and blocks of 64 or 128 slots keep each
    program's loop short; the decoders' buffers (``kv_cache.aligned_capacity``)
    are sized so that long caches get 16 splits of 64-slot blocks or better.
    """
    for blocks in ((128, 64), (32, 16)):
        for k_splits in (16, 8, 4, 2, 1):
            for block_k in blocks:
                if capacity % (k_splits * block_k) == 0:
                    return k_splits, block_k
    return None


@functools.cache
def kernel_module():
    """JAX's Pallas decode-attention module, or None where this JAX has none.

    JAX 0.11 marks the module deprecated (a DeprecationWarning on import,
    silenced here); when a release drops it, the backend runs the portable
    block loop instead.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import decode_attention
    except ImportError:
        return None
    return decode_attention if hasattr(decode_attention, "decode_attn_unbatched") else None


def _kernel_prefix(qg: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array, tiling) -> Partial:
    pallas_decode = kernel_module()
    b, hkv, g, t, d = qg.shape
    k_splits, block_k = tiling
    rows = qg.reshape(b, hkv, g * t, d)
    lengths = jnp.broadcast_to(kv_lengths[:, None], (b, hkv)).astype(jnp.int32)
    one = functools.partial(
        pallas_decode.decode_attn_unbatched, sm_scale=d ** -0.5, block_h=BLOCK_H, block_k=block_k,
        k_splits=k_splits, num_warps=None, num_stages=2, grid=None, interpret=jax.default_backend() != "gpu",
        debug=False, return_residuals=True, normalize_output=False)
    out, (total, peak) = jax.vmap(jax.vmap(lambda q_, k_, v_, n_: one(q_, k_, v_, None, n_)))(rows, k, v, lengths)
    return Partial(m=peak.reshape(b, hkv, g, t).astype(jnp.float32),
                   l=total.reshape(b, hkv, g, t).astype(jnp.float32),
                   acc=out.reshape(b, hkv, g, t, d).astype(jnp.float32))


def pallas_gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, layer: int,
                         meta: AttentionMetadata) -> tuple[jax.Array, KVCache]:
    """Writes ``k``/``v`` [batch, T, kv_heads, head_dim] at ``meta.slots`` of ``layer``, then attends
    ``q`` [batch, T, q_heads, head_dim]: the prefix by the Pallas kernel, the window portably."""
    tiling = kernel_tiling(cache.capacity)
    rows = (q.shape[2] // k.shape[2]) * q.shape[1]  # groups * T query rows per KV head
    if tiling is not None and rows <= MAX_KERNEL_ROWS and kernel_module() is not None:
        prefix_fn = functools.partial(_kernel_prefix, tiling=tiling)
    else:
        prefix_fn = functools.partial(prefix_blocks, block=PREFIX_BLOCK)
    return live_length_attention(prefix_fn, q, k, v, cache, layer, meta)
