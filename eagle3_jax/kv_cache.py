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
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from eagle3_jax.sharding import KV_CACHE_AXES, LogicalAxes, constrain

# Decoders allocate buffers in whole blocks (:func:`aligned_capacity`), so that blocked attention
# kernels tile every cache without a remainder: 128 slots, doubling up to 1024 while the rounding
# stays within 1/32 of the capacity.
SLOT_ALIGN = 128
MAX_SLOT_ALIGN = 1024


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
        (``eagle3_jax/sharding.py``): rows over ``data`` and KV heads over
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
            return tuple(constrain(jnp.zeros(shape, dtype), axes) for _ in range(num_layers))

        return cls(k=buffers(), v=buffers(), lengths=constrain(jnp.zeros((batch,), jnp.int32), axes[:1]), axes=axes)

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

    def with_lengths(self, lengths: jax.Array) -> KVCache:
        return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))

    def layer_view(self, layer: int) -> KVCache:
        """A one-layer cache of ``layer``'s buffers (same lengths and axes), for per-shard attention."""
        return dataclasses.replace(self, k=(self.k[layer],), v=(self.v[layer],))

    def with_layer(self, layer: int, k: jax.Array, v: jax.Array) -> KVCache:
        """This cache with ``layer``'s buffers replaced."""
        return dataclasses.replace(self, k=_replace(self.k, layer, k), v=_replace(self.v, layer, v))

    def gather_slots(self, src: jax.Array, dst: jax.Array) -> KVCache:
        """Copies K/V of every layer from slots ``src`` to slots ``dst`` (both [batch, n]).

        This is how a verified tree path is compacted into contiguous slots;
        destinations outside the buffer are dropped.
        """
        b = jnp.arange(src.shape[0])[:, None]
        src = jnp.clip(src, 0, self.capacity - 1)

        def move(buf):
            return constrain(buf.at[b, :, dst].set(buf[b, :, src], mode="drop"), self.axes)

        return dataclasses.replace(self, k=tuple(map(move, self.k)), v=tuple(map(move, self.v)))


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
