"""The static-capacity KV cache (docs/architecture.md#kv-cache).

A cache is a pytree of two stacked buffers and per-row lengths. Its capacity is
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values in static buffers.

    The head-major layout ([..., kv_heads, capacity, head_dim]) is what the
    attention dots read directly; a slot-major layout costs a transpose of
    the whole buffer per layer and step.

    Attributes:
      k: [layers, batch, kv_heads, capacity, head_dim] keys (after RoPE).
      v: [layers, batch, kv_heads, capacity, head_dim] values.
      lengths: [batch] int32, committed entries per row; slots >= length are
        free (they may hold stale or provisional K/V).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, *, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
               dtype=jnp.bfloat16) -> KVCache:
        """An empty cache (all lengths 0) of static ``capacity`` slots per row."""
        shape = (num_layers, batch, kv_heads, capacity, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def dtype(self):
        return self.k.dtype

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, slots: jax.Array) -> KVCache:
        """Stores new K/V of one layer at per-token slots.

        Args:
          layer: static layer index.
          k_new, v_new: [batch, seq, kv_heads, head_dim].
          slots: [batch, seq] int32 destination slots, never negative (JAX
            would wrap a negative index); entries at or past capacity are dropped.
        """
        b = jnp.arange(k_new.shape[0])[:, None]
        # (batch, slot) index pairs around the head slice: the update is [batch, seq, kv_heads, head_dim]
        k = self.k.at[layer, b, :, slots].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[layer, b, :, slots].set(v_new.astype(self.v.dtype), mode="drop")
        return dataclasses.replace(self, k=k, v=v)

    def with_lengths(self, lengths: jax.Array) -> KVCache:
        return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))

    def gather_slots(self, src: jax.Array, dst: jax.Array) -> KVCache:
        """Copies K/V of every layer from slots ``src`` to slots ``dst`` (both [batch, n]).

        This is how a verified tree path is compacted into contiguous slots;
        destinations outside the buffer are dropped.
        """
        b = jnp.arange(src.shape[0])[:, None]
        src = jnp.clip(src, 0, self.capacity - 1)
        k = self.k.at[:, b, :, dst].set(self.k[:, b, :, src], mode="drop")
        v = self.v.at[:, b, :, dst].set(self.v[:, b, :, src], mode="drop")
        return dataclasses.replace(self, k=k, v=v)


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
