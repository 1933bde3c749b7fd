"""Attention in parts merged by their log-sum-exp (docs/architecture.md#attention).

Softmax attention over a set of keys can be computed over disjoint parts and
merged exactly: each part keeps, per query, the running maximum score ``m``,
the sum of ``exp(score - m)`` (``l``) and the unnormalised weighted sum of
values (``acc``). The live-length backends split every forward's attention
into

* the committed prefix (slots below ``kv_lengths``), read block by block
  from the cache up to the longest live row (:func:`prefix_blocks`) or by a
  kernel, and
* the window of W slots after the prefix, read with the forward's
  ``local_mask`` (:func:`window_part`),

and :func:`merge` / :meth:`Partial.finish` combine them. Queries are grouped
by KV head: ``[batch, kv_heads, groups, T, head_dim]`` with
``groups = q_heads // kv_heads``. Scores, ``m``, ``l`` and ``acc`` are float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from eagle3_jax.attention.metadata import AttentionMetadata
from eagle3_jax.kv_cache import KVCache, row_access

# Scores of hidden keys; finite (as in the reference backend), and the starting maximum of a part.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Partial:
    """Attention of grouped queries over one part of the keys.

    Attributes:
      m: [batch, kv_heads, groups, T] float32 maximum visible score (MASK_VALUE if none).
      l: [batch, kv_heads, groups, T] float32 sum of exp(score - m) over visible keys.
      acc: [batch, kv_heads, groups, T, head_dim] float32 sum of exp(score - m) * value.
    """

    m: jax.Array
    l: jax.Array  # noqa: E741 (the flash-attention papers' name)
    acc: jax.Array

    @classmethod
    def empty(cls, q: jax.Array) -> Partial:
        """Nothing seen yet, for grouped queries ``q`` [batch, kv_heads, groups, T, head_dim]."""
        shape = q.shape[:-1]
        return cls(m=jnp.full(shape, MASK_VALUE, jnp.float32), l=jnp.zeros(shape, jnp.float32),
                   acc=jnp.zeros(q.shape, jnp.float32))

    def finish(self) -> jax.Array:
        """The normalised output [batch, kv_heads, groups, T, head_dim] (zeros for a query that saw nothing)."""
        return self.acc / jnp.where(self.l > 0, self.l, 1.0)[..., None]


def merge(a: Partial, b: Partial) -> Partial:
    """The attention over the union of the two parts' keys."""
    m = jnp.maximum(a.m, b.m)
    ca, cb = jnp.exp(a.m - m), jnp.exp(b.m - m)
    return Partial(m=m, l=a.l * ca + b.l * cb, acc=a.acc * ca[..., None] + b.acc * cb[..., None])


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """[batch, T, q_heads, head_dim] -> [batch, kv_heads, groups, T, head_dim]."""
    b, t, hq, d = q.shape
    return q.reshape(b, t, kv_heads, hq // kv_heads, d).transpose(0, 2, 3, 1, 4)


def ungroup(out: jax.Array, dtype) -> jax.Array:
    """[batch, kv_heads, groups, T, head_dim] -> [batch, T, q_heads, head_dim] in ``dtype``."""
    b, hkv, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * g, d).astype(dtype)


def part(qg: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> Partial:
    """Attention of grouped queries over keys and values [batch, kv_heads, S, head_dim].

    ``visible`` broadcasts to [batch, 1, 1, T, S] (True: the query sees the key).
    """
    d = qg.shape[-1]
    scores = jnp.einsum("bkgtd,bksd->bkgts", qg, k.astype(qg.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(visible, scores * (d ** -0.5), MASK_VALUE)
    m = jnp.max(scores, axis=-1)
    p = jnp.where(visible, jnp.exp(scores - m[..., None]), 0.0)
    acc = jnp.einsum("bkgts,bksd->bkgtd", p.astype(qg.dtype), v.astype(qg.dtype), preferred_element_type=jnp.float32)
    return Partial(m=m, l=jnp.sum(p, axis=-1), acc=acc)


def prefix_blocks(qg: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array, block: int) -> Partial:
    """Attention over each row's committed prefix (slots below ``kv_lengths``), block by block.

    A loop of ``ceil(max(kv_lengths) / block)`` trips (a dynamic count: the
    cost follows the longest live row, not the capacity) reads blocks of
    ``block`` slots of the layer's buffers ``k``, ``v`` [batch, kv_heads,
    capacity, head_dim] where they lie (a dynamic slice, no copy of the buffer).
    """
    capacity = k.shape[2]
    block = min(block, capacity)
    offsets = jnp.arange(block, dtype=jnp.int32)
    trips = (jnp.max(kv_lengths) + block - 1) // block

    def body(i, acc: Partial) -> Partial:
        lo = i * block
        start = jnp.minimum(lo, capacity - block)  # the last block may overlap the one before: mask the overlap
        kb = jax.lax.dynamic_slice_in_dim(k, start, block, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(v, start, block, axis=2)
        slot = start + offsets
        visible = (slot[None, :] < kv_lengths[:, None]) & (slot >= lo)[None, :]  # [batch, block]
        return merge(acc, part(qg, kb, vb, visible[:, None, None, None, :]))

    return jax.lax.fori_loop(0, trips, body, Partial.empty(qg))


def dense_prefix(qg: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array) -> Partial:
    """The same :class:`Partial` as :func:`prefix_blocks`, scoring every slot of the buffer at once."""
    slot = jnp.arange(k.shape[2], dtype=jnp.int32)
    return part(qg, k, v, (slot[None, :] < kv_lengths[:, None])[:, None, None, None, :])


def with_dense_gradient(prefix_fn: Callable[..., Partial]) -> Callable[..., Partial]:
    """``prefix_fn(qg, k, v, kv_lengths) -> Partial``, made reverse-differentiable.

    A loop with a traced trip count (and a Pallas kernel) has no reverse-mode
    derivative in JAX. The prefix's attention is the same function however it
    is computed, so the backward pass takes the VJP of :func:`dense_prefix`
    (whose cost follows the capacity, which only a gradient through a cached
    forward pays: fitting a head through its cache in the tests; training
    uses its own attention, ``training/ttt_attention.py``). Forward-mode
    derivatives (``jax.jvp``) of the wrapped function are not defined.
    """
    @jax.custom_vjp
    def prefix(qg, k, v, kv_lengths):
        return prefix_fn(qg, k, v, kv_lengths)

    def forward(qg, k, v, kv_lengths):
        return prefix_fn(qg, k, v, kv_lengths), (qg, k, v, kv_lengths)

    def backward(saved, cotangent):
        qg, k, v, kv_lengths = saved
        _, vjp = jax.vjp(lambda q_, k_, v_: dense_prefix(q_, k_, v_, kv_lengths), qg, k, v)
        return (*vjp(cotangent), None)

    prefix.defvjp(forward, backward)
    return prefix


def window_part(qg: jax.Array, kw: jax.Array, vw: jax.Array, meta: AttentionMetadata, capacity: int) -> Partial:
    """Attention over the W window slots ``kv_lengths + j`` through ``meta.local_mask`` [batch or 1, T, W],
    given their K and V ``kw``, ``vw`` [batch, kv_heads, W, head_dim] (slots past the buffer are hidden)."""
    slots = meta.kv_lengths[:, None] + jnp.arange(meta.window, dtype=jnp.int32)[None, :]  # [batch, W]
    visible = meta.local_mask & (slots < capacity)[:, None, :]  # [batch, T, W]
    return part(qg, kw, vw, visible[:, None, None, :, :])


def write_and_window(k: jax.Array, v: jax.Array, cache: KVCache, layer: int, meta: AttentionMetadata
                     ) -> tuple[KVCache, jax.Array, jax.Array]:
    """Writes the new K/V at ``meta.slots`` and returns (the cache, the window's K and V
    [batch, kv_heads, W, head_dim]) through ``KVCache.write_window`` (in place on every platform);
    a window as wide as the buffer or wider (a dense mask) writes at arbitrary slots and gathers the window."""
    if meta.window < cache.capacity:
        return cache.write_window(layer, k, v, meta.slots, meta.kv_lengths, meta.window)
    cache = cache.write(layer, k, v, meta.slots)
    return (cache, *cache.gather_window(layer, meta.kv_lengths, meta.window))


PrefixFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], Partial]


def live_length_attention(prefix_fn: PrefixFn, q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, layer: int,
                          meta: AttentionMetadata) -> tuple[jax.Array, KVCache]:
    """What every live-length backend does, given how it reads the prefix.

    Writes ``k``/``v`` [batch, T, kv_heads, head_dim] at ``meta.slots`` of
    ``layer``, attends ``q`` [batch, T, q_heads, head_dim] over the prefix with
    ``prefix_fn(qg, k_buffer, v_buffer, kv_lengths) -> Partial`` (made
    reverse-differentiable by :func:`with_dense_gradient`) and over the window
    with :func:`window_part`, and merges the two. The prefix (slots below ``kv_lengths``, which
    the write does not touch) is read after the write with the batched row access and before it
    with the rows access (``kv_cache.row_access``): the order each platform's compiler updates
    the buffer in place with.
    """
    qg = group_queries(q, cache.k[layer].shape[1])
    prefix_first = row_access() == "rows"
    if prefix_first:  # (TPU) the write is then the buffer's last use: a loop reading it after would copy it
        prefix = with_dense_gradient(prefix_fn)(qg, cache.k[layer], cache.v[layer], meta.kv_lengths)
    cache, kw, vw = write_and_window(k, v, cache, layer, meta)
    if not prefix_first:  # (CPU, GPU) a scatter updates in place before the reads
        prefix = with_dense_gradient(prefix_fn)(qg, cache.k[layer], cache.v[layer], meta.kv_lengths)
    out = merge(prefix, window_part(qg, kw, vw, meta, cache.capacity)).finish()
    return ungroup(out, q.dtype), cache
