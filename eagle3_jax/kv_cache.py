"""The static-capacity KV cache (docs/architecture.md#kv-cache).

A cache is a pytree of one pair of buffers per layer and per-row lengths. Its capacity is
fixed at creation (it is a compiled shape); what varies between calls and loop
steps lives in ``lengths``. A forward pass writes the K/V of its new tokens at
explicit slots and attends as its :class:`~eagle3_jax.attention.AttentionMetadata`
says (the committed prefix plus a window of provisional slots), so one model
call serves prefill, decode and tree verification:

* prefill / decode: slots ``lengths + t``, each token seeing the prefix and
  the new tokens up to itself (``AttentionMetadata.causal``);
* tree verification: slots ``lengths + i`` for the N tree nodes, each seeing
  the prefix and its tree ancestors (``decoding/tree.py: verify_attention``).

:func:`append_slots` and :func:`causal_mask` build the same thing as dense
arrays, for tests and references (``AttentionMetadata.dense``).

Writing K/V never advances ``lengths``: the caller commits what it accepts.
Slots at or past the capacity are dropped, never wrapped or clamped, so an
overflowing write can not corrupt committed entries.

Forwards and commits touch each row's *window*, the W slots after its
committed prefix, through :meth:`KVCache.write_window` and
:meth:`KVCache.move_in_window`: a row's window is read as one block, changed
in that small block, and written back. How a row's block is reached is the
platform's (:data:`ROW_ACCESS`): one batched gather and scatter where buffers
have fixed layouts (CPU, GPU), one dynamic slice per row on TPU, whose layout
assignment would otherwise re-tile the whole buffers around a batched gather
or scatter and copy every cache into and out of the loop
(docs/architecture.md#kv-cache).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

try:  # the layout API (JAX 0.6 and later keep it here; only the TPU's rows access uses it)
    from jax.experimental.layout import Layout, with_layout_constraint
except ImportError:  # pragma: no cover - a JAX without it: layouts are left to the compiler
    Layout = with_layout_constraint = None

from eagle3_jax.axes import KV_CACHE_AXES, LogicalAxes, constrain
from eagle3_jax.platform import target_platform

# Decoders allocate buffers in whole blocks (:func:`aligned_capacity`), so that blocked attention
# kernels tile every cache without a remainder: 128 slots, doubling up to 1024 while the rounding
# stays within 1/32 of the capacity.
SLOT_ALIGN = 128
MAX_SLOT_ALIGN = 1024


# How each platform reaches a row's window: "batched" (one scatter and gather over all rows at
# their slots) or "rows" (the window as one block per row: a dynamic slice and update per row, a
# loop over the rows when there are several).
ROW_ACCESS = {"tpu": "rows"}
# A row's block is at least this many slots (one bfloat16 sublane tile of the TPU): a narrower
# block (a decode step's single slot) would be tiled differently from the buffer and pull the
# whole buffer's layout to its own.
MIN_ROW_BLOCK = 16


def row_access() -> str:
    """"rows" or "batched": how programs traced now reach each row's window (:data:`ROW_ACCESS`)."""
    return ROW_ACCESS.get(target_platform(), "batched")


def read_rows(buf: jax.Array, start: jax.Array, width: int) -> jax.Array:
    """[batch, heads, width, dim]: slots ``start[b] .. start[b] + width - 1`` of each row of ``buf``
    [batch, heads, capacity, dim], one dynamic slice per row; ``start`` [batch] int32 must lie in
    ``[0, capacity - width]``."""
    batch, heads, _, dim = buf.shape
    if batch == 1:
        return keep_layout(jax.lax.dynamic_slice(buf, (0, 0, start[0], 0), (1, heads, width, dim)))

    def row(b, out):
        block = jax.lax.dynamic_slice(buf, (b, 0, start[b], 0), (1, heads, width, dim))
        return jax.lax.dynamic_update_slice(out, block, (b, 0, 0, 0))

    return keep_layout(jax.lax.fori_loop(0, batch, row, jnp.zeros((batch, heads, width, dim), buf.dtype)))


def write_rows(buf: jax.Array, start: jax.Array, blocks: jax.Array) -> jax.Array:
    """``buf`` with slots ``start[b] ..`` of each row replaced by ``blocks`` [batch, heads, width, dim],
    in place, one dynamic update per row; ``start`` as for :func:`read_rows`. The result keeps the
    buffers' row-major layout (:func:`keep_layout`)."""
    if blocks.shape[0] == 1:
        return keep_layout(jax.lax.dynamic_update_slice(buf, blocks, (0, 0, start[0], 0)))

    def row(b, out):
        block = jax.lax.dynamic_slice_in_dim(blocks, b, 1, axis=0)
        return jax.lax.dynamic_update_slice(out, block, (b, 0, start[b], 0))

    return keep_layout(jax.lax.fori_loop(0, blocks.shape[0], row, buf))


def pin_row_major(x: jax.Array) -> jax.Array:
    """``x`` pinned to the row-major layout where the cache's buffers are (the rows access: TPU),
    ``x`` itself elsewhere.

    The attention's Q/K/V projections call it on their outputs: left free, TPU layout assignment
    of a forward of several rows or tokens (a verify, a batch) emits them heads-before-tokens and
    pays for it by laying every layer's projection weights out again, copies made once before the
    loop that held 1.1 GB of temporaries for Qwen3-4B.
    """
    return keep_layout(x) if row_access() == "rows" else x


def keep_layout(buf: jax.Array) -> jax.Array:
    """``buf`` pinned to the row-major layout the cache's buffers have outside a program.

    Inside a loop, TPU layout assignment lays a carried buffer out as its updates prefer (a
    decode step's [batch, kv_heads, 1, head_dim] update prefers the capacity axis before the
    heads); a buffer that enters and leaves the program row-major is then copied whole in and
    out of every loop. Pinned (the buffers, and the blocks read from them), the small blocks are
    re-tiled instead.
    """
    if with_layout_constraint is None:
        return buf
    return with_layout_constraint(buf, Layout(major_to_minor=tuple(range(buf.ndim))))


def aligned_capacity(capacity: int) -> int:
    """``capacity`` rounded up to a multiple of 128 slots, or of a larger power of two up to 1024
    for long caches (at most ``capacity / 32`` slots added past 4096)."""
    align = SLOT_ALIGN
    while align * 2 <= min(MAX_SLOT_ALIGN, capacity // 32):
        align *= 2
    return -(-capacity // align) * align


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values in static buffers.

    Each layer has its own pair of buffers, not a slice of one stacked
    array: a layer's attention reads its buffer where it lies and a write
    updates it in place, with no per-layer slice copied out first
    (docs/architecture.md#kv-cache). The head-major layout
    ([batch, kv_heads, capacity, head_dim]) is what the attention dots and
    the GPU kernel read directly.

    Attributes:
      k: per layer, [batch, kv_heads, capacity, head_dim] keys (after RoPE).
      v: per layer, [batch, kv_heads, capacity, head_dim] values.
      lengths: [batch] int32, committed entries per row; slots >= length are
        free (they may hold stale or provisional K/V).
      axes: static; the buffers' logical axes on a device mesh
        (``eagle3_jax/axes.py``): rows over ``data`` and KV heads over
        ``tensor`` for the target; the draft head's cache keeps its heads whole.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array
    axes: LogicalAxes = dataclasses.field(default=KV_CACHE_AXES, metadata=dict(static=True))

    @classmethod
    def create(cls, *, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
               dtype=jnp.bfloat16, axes: LogicalAxes = KV_CACHE_AXES) -> KVCache:
        """An empty cache (all lengths 0) of static ``capacity`` slots per row, laid out on the
        current device mesh by ``axes`` (if there is one)."""
        shape = (batch, kv_heads, capacity, head_dim)

        def buffers():
            return tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))

        return cls(k=buffers(), v=buffers(), lengths=jnp.zeros((batch,), jnp.int32), axes=axes).constrain_layout()

    def constrain_layout(self) -> KVCache:
        """The cache laid out by its own ``axes`` on the current mesh (``axes.constrain_tree``)."""
        return dataclasses.replace(self, k=tuple(constrain(b, self.axes) for b in self.k),
                                   v=tuple(constrain(b, self.axes) for b in self.v),
                                   lengths=constrain(self.lengths, self.axes[:1]))

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def dtype(self):
        return self.k[0].dtype

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, slots: jax.Array) -> KVCache:
        """Stores new K/V of one layer at per-token slots (an in-place scatter).

        Args:
          layer: static layer index.
          k_new, v_new: [batch, seq, kv_heads, head_dim].
          slots: [batch, seq] int32 destination slots, never negative (JAX
            would wrap a negative index); entries at or past capacity are dropped.
        """
        b = jnp.arange(k_new.shape[0])[:, None]
        # (batch, slot) index pairs around the head slice: the update is [batch, seq, kv_heads, head_dim]
        k = self.k[layer].at[b, :, slots].set(k_new.astype(self.dtype), mode="drop")
        v = self.v[layer].at[b, :, slots].set(v_new.astype(self.dtype), mode="drop")
        return self.with_layer(layer, k, v)

    def block_width(self, width: int) -> int:
        """Slots in a row's block for a window of ``width``: at least :data:`MIN_ROW_BLOCK`,
        at most the capacity."""
        return min(max(width, MIN_ROW_BLOCK), self.capacity)

    def window_start(self, base: jax.Array, width: int) -> jax.Array:
        """[batch] int32: where a row's window block of ``width`` slots starts, ``base`` clamped
        into the buffer (a window running past the capacity starts early; its slots past the
        capacity are not in the block)."""
        return jnp.clip(base.astype(jnp.int32), 0, self.capacity - width)

    def write_window(self, layer: int, k_new: jax.Array, v_new: jax.Array, slots: jax.Array, base: jax.Array,
                     width: int) -> tuple[KVCache, jax.Array, jax.Array]:
        """Stores new K/V of one layer at ``slots`` inside each row's window, in place, and returns
        the window after the write.

        Args:
          layer: static layer index.
          k_new, v_new: [batch, T, kv_heads, head_dim].
          slots: [batch, T] int32, each in ``base .. base + width - 1`` or dropped (at or past the
            capacity, or outside the window: the int32 maximum marks a dropped write).
          base: [batch] int32, the first slot of each row's window (its committed length).
          width: static window size W, at most the capacity.
        Returns:
          (the cache, K and V of slots ``base + j`` [batch, kv_heads, W, head_dim]; entries for
          slots past the capacity are arbitrary).
        """
        window = base.astype(jnp.int32)[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]  # [batch, W]
        if row_access() == "batched":
            cache = self.write(layer, k_new, v_new, slots)
            return (cache, *cache.gather_window(layer, base, width))
        block_width = self.block_width(width)
        start = self.window_start(base, block_width)
        b = jnp.arange(k_new.shape[0])[:, None]
        rel = slots - start[:, None]
        rel = jnp.where((rel >= 0) & (rel < block_width), rel, block_width)  # outside the block: dropped

        def update(buf, new):
            block = read_rows(buf, start, block_width).at[b, :, rel].set(new.astype(self.dtype), mode="drop")
            return write_rows(buf, start, block), block

        k, kw = update(self.k[layer], k_new)
        v, vw = update(self.v[layer], v_new)
        # block order -> window order (the same but for a window clamped at the end of the buffer)
        index = jnp.clip(window - start[:, None], 0, block_width - 1)[:, None, :, None]
        kw, vw = jnp.take_along_axis(kw, index, axis=2), jnp.take_along_axis(vw, index, axis=2)
        return self.with_layer(layer, k, v), kw, vw

    def gather_window(self, layer: int, base: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
        """K and V of slots ``base + j`` (j < ``width``) of ``layer``, [batch, kv_heads, width, head_dim],
        one batched gather (slots past the buffer read its last slot)."""
        window = base.astype(jnp.int32)[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
        index = jnp.clip(window, 0, self.capacity - 1)[:, None, :, None]
        return jnp.take_along_axis(self.k[layer], index, axis=2), jnp.take_along_axis(self.v[layer], index, axis=2)

    def move_in_window(self, base: jax.Array, src: jax.Array, dst: jax.Array, width: int) -> KVCache:
        """Copies K/V of every layer from slots ``base + src`` to ``base + dst`` inside each row's
        window of ``width`` slots (how a verified tree path is compacted into contiguous slots).

        Args:
          base: [batch] int32 window starts (the committed lengths).
          src: [batch, n] int32 offsets in ``0 .. width - 1``.
          dst: [batch, n] int32 offsets; outside ``0 .. width - 1`` or past the capacity: dropped.
        """
        b = jnp.arange(src.shape[0])[:, None]
        base = base.astype(jnp.int32)[:, None]
        if row_access() == "batched":
            src_slots = jnp.clip(base + src, 0, self.capacity - 1)
            dst_slots = jnp.where((dst >= 0) & (dst < width), base + dst, self.capacity)

            def move(buf):
                return constrain(buf.at[b, :, dst_slots].set(buf[b, :, src_slots], mode="drop"), self.axes)
        else:
            block_width = self.block_width(width)
            start = self.window_start(base[:, 0], block_width)
            shift = base - start[:, None]  # > 0 only for a window clamped at the end of the buffer
            src_rel = jnp.clip(src + shift, 0, block_width - 1)
            dst_rel = jnp.where((dst >= 0) & (dst < width) & (dst + shift < block_width), dst + shift, block_width)

            def move(buf):
                block = read_rows(buf, start, block_width)
                block = block.at[b, :, dst_rel].set(block[b, :, src_rel], mode="drop")
                return constrain(write_rows(buf, start, block), self.axes)

        return dataclasses.replace(self, k=tuple(map(move, self.k)), v=tuple(map(move, self.v)))

    def with_lengths(self, lengths: jax.Array) -> KVCache:
        return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))

    def layer_view(self, layer: int) -> KVCache:
        """A one-layer cache of ``layer``'s buffers (same lengths and axes), for per-shard attention."""
        return dataclasses.replace(self, k=(self.k[layer],), v=(self.v[layer],))

    def with_layer(self, layer: int, k: jax.Array, v: jax.Array) -> KVCache:
        """This cache with ``layer``'s buffers replaced."""
        return dataclasses.replace(self, k=_replace(self.k, layer, k), v=_replace(self.v, layer, v))


def _replace(buffers: tuple[jax.Array, ...], layer: int, new: jax.Array) -> tuple[jax.Array, ...]:
    return buffers[:layer] + (new,) + buffers[layer + 1:]


def append_slots(lengths: jax.Array, seq: int) -> jax.Array:
    """Slots right after each row's committed entries: [batch, seq] = lengths[:, None] + t."""
    return lengths[:, None].astype(jnp.int32) + jnp.arange(seq, dtype=jnp.int32)[None, :]


def causal_mask(lengths: jax.Array, seq: int, capacity: int) -> jax.Array:
    """[batch, seq, capacity] bool: new token t sees every slot up to and including its own.

    For tokens written at :func:`append_slots` this is ordinary causal
    attention over the committed prefix plus the new tokens.
    """
    slot = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
    return slot <= append_slots(lengths, seq)[:, :, None]
