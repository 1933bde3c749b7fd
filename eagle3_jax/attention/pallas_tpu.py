"""The TPU backend: the committed prefix through a Pallas TPU kernel (docs/architecture.md#attention).

A flash-decoding kernel over a layer's buffers where they lie ([batch, kv_heads, capacity,
head_dim], row-major): one program per (row, KV head, block of ``block_k`` slots), the row's
committed length read from scalar memory (scalar prefetch), an online softmax carried across
the row's blocks in VMEM scratch, and the unnormalised output with its running maximum and sum
returned: exactly a :class:`~eagle3_jax.attention.partial.Partial` of the prefix, merged with
the portable window part by log-sum-exp as the other live-length backends do. Blocks past a
row's length neither compute nor fetch anything new: their index map repeats the row's last
live block, which the pipeline does not copy again. All T new tokens of a row share its
prefix, so their queries ride together with the head group's (``groups * T`` query rows per KV
head).

The kernel reads no page table yet; the per-(row, head) block index map is where a paged cache's
table would go. Off a TPU it runs in Pallas interpret mode (how the backend tests run it on CPU).
A buffer no block divides, and forwards with many new tokens (prefill chunks), go to the
portable block loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

try:  # Pallas and its TPU dialect (a JAX without them: the portable block loop serves the prefix)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
    pl = pltpu = None

from eagle3_jax.attention.blockwise import PREFIX_BLOCK
from eagle3_jax.attention.metadata import AttentionMetadata
from eagle3_jax.attention.partial import MASK_VALUE, Partial, live_length_attention, prefix_blocks
from eagle3_jax.kv_cache import KVCache
from eagle3_jax.platform import target_platform

BLOCK_K = 512  # slots per program: a few hundred KB of K and V per block in bfloat16
MAX_KERNEL_ROWS = 512  # query rows (groups * T) per KV head served by the kernel; prefill chunks go to the loop


def kernel_block(capacity: int) -> int | None:
    """The kernel's block of slots for a buffer of ``capacity``, or None if none divides it (the
    decoders' buffers, ``kv_cache.aligned_capacity``, are multiples of 128 slots)."""
    for block in (BLOCK_K, 256, 128):
        if capacity % block == 0:
            return block
    return None


def _kernel(lengths_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, m_scr, l_scr, acc_scr, *, block: int,
            scale: float):
    b, i = pl.program_id(0), pl.program_id(2)
    length = lengths_ref[b]

    @pl.when(i == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(i * block < length)
    def _block():
        q = q_ref[0, 0]  # [rows, head_dim]
        k = k_ref[0, 0]  # [block, head_dim]
        v = v_ref[0, 0]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        slot = i * block + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(slot < length, s, MASK_VALUE)  # [rows, block]
        m_prev = m_scr[...]  # [rows, 1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        p = jnp.where(slot < length, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_scr[...] = alpha * acc_scr[...] + jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        m_scr[...] = m_new

    @pl.when(i == pl.num_programs(2) - 1)
    def _done():
        acc_ref[0, 0] = acc_scr[...]
        m_ref[0, 0] = m_scr[...]
        l_ref[0, 0] = l_scr[...]


def kernel_prefix(qg: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array, block: int) -> Partial:
    """The prefix :class:`Partial` of ``qg`` [batch, kv_heads, groups, T, head_dim] over the slots
    below ``kv_lengths`` [batch] of ``k``, ``v`` [batch, kv_heads, capacity, head_dim]."""
    b, hkv, g, t, d = qg.shape
    capacity = k.shape[2]
    rows = g * t
    q = qg.reshape(b, hkv, rows, d).astype(k.dtype)
    lengths = kv_lengths.astype(jnp.int32)

    def kv_index(bi, h, i, lens):  # past the row's last live block: the same block again (no new copy)
        last = jax.lax.div(jnp.maximum(lens[bi] - 1, 0), block)  # (lax.div: // would lower a sign op)
        return bi, h, jnp.minimum(i, last), 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, hkv, capacity // block),
        in_specs=[pl.BlockSpec((1, 1, rows, d), lambda bi, h, i, lens: (bi, h, 0, 0)),
                  pl.BlockSpec((1, 1, block, d), kv_index),
                  pl.BlockSpec((1, 1, block, d), kv_index)],
        out_specs=[pl.BlockSpec((1, 1, rows, d), lambda bi, h, i, lens: (bi, h, 0, 0)),
                   pl.BlockSpec((1, 1, rows, 1), lambda bi, h, i, lens: (bi, h, 0, 0)),
                   pl.BlockSpec((1, 1, rows, 1), lambda bi, h, i, lens: (bi, h, 0, 0))],
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, d), jnp.float32)],
    )
    acc, peak, total = pl.pallas_call(
        functools.partial(_kernel, block=block, scale=d ** -0.5),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, hkv, rows, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, rows, 1), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, rows, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=target_platform() != "tpu",
        name="eagle3_prefix_attention",
    )(lengths, q, k, v)
    return Partial(m=peak.reshape(b, hkv, g, t), l=total.reshape(b, hkv, g, t), acc=acc.reshape(b, hkv, g, t, d))


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, layer: int,
                         meta: AttentionMetadata) -> tuple[jax.Array, KVCache]:
    """Writes ``k``/``v`` [batch, T, kv_heads, head_dim] at ``meta.slots`` of ``layer``, then attends
    ``q`` [batch, T, q_heads, head_dim]: the prefix by the Pallas TPU kernel, the window portably."""
    block = kernel_block(cache.capacity)
    rows = (q.shape[2] // k.shape[2]) * q.shape[1]
    if block is not None and rows <= MAX_KERNEL_ROWS and pltpu is not None:
        prefix_fn = functools.partial(kernel_prefix, block=block)
    else:
        prefix_fn = functools.partial(prefix_blocks, block=PREFIX_BLOCK)
    return live_length_attention(prefix_fn, q, k, v, cache, layer, meta)
