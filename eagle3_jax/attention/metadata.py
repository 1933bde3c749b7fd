"""What a forward's attention needs to know, as one pytree (docs/architecture.md#attention).

Every forward of the target or the draft head writes the K/V of its T new
tokens into a static cache and attends over it. Instead of a dense
``[batch, T, capacity]`` mask built by each caller, the caller describes the
attention by what varies:

* ``kv_lengths`` [batch]: the committed prefix. Every new token sees every
  slot below it.
* ``local_mask`` [batch, T, W]: what each new token sees in the *window* of
  W slots right after the prefix (slots ``kv_lengths + j``, j < W): causal
  for prefill chunks and decode, the tree's ancestors for verification, the
  beam's ancestry for drafting.
* ``slots`` [batch, T]: where the new K/V go (outside the buffer: dropped).
* ``positions`` [batch, T]: the RoPE positions of the new tokens.

A backend may cost the prefix (a loop over ``kv_lengths``) plus the window
rather than the whole capacity; the reference backend builds the dense mask
(:meth:`AttentionMetadata.dense_mask`) and scores every slot. Which backend
runs is a static name carried in the metadata (``backend``), so it is part of
the compiled program, never a traced value.

Nothing here needs the window to hold the new tokens only: with
``kv_lengths = 0`` and W = capacity, ``local_mask`` is an arbitrary dense
mask (what the training-time-test pattern over a cache uses).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

DEFAULT_BACKEND = "auto"  # the platform's default backend (eagle3_jax.attention.resolve_backend)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Attributes:
      positions: [batch, T] int32 RoPE positions of the new tokens.
      slots: [batch, T] int32 cache slots of their K/V, never negative;
        entries at or past the capacity are dropped (finished rows and
        rejected tokens get the int32 maximum; nothing adds to a slot).
      kv_lengths: [batch] int32 committed prefix seen in full by every new token.
      local_mask: [batch or 1, T, W] bool over slots ``kv_lengths + j``.
      backend: static name of the attention implementation
        (:data:`eagle3_jax.attention.BACKENDS`).
    """

    positions: jax.Array
    slots: jax.Array
    kv_lengths: jax.Array
    local_mask: jax.Array
    backend: str = dataclasses.field(default=DEFAULT_BACKEND, metadata=dict(static=True))

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[1]

    @property
    def window(self) -> int:
        return self.local_mask.shape[-1]

    # ---------------------------------------------------------------- builders

    @classmethod
    def causal(cls, kv_lengths: jax.Array, seq: int, *, valid: jax.Array | None = None, write: jax.Array | None = None,
               backend: str = DEFAULT_BACKEND) -> AttentionMetadata:
        """``seq`` new tokens appended after each row's prefix: positions and slots
        ``kv_lengths + t``, token t seeing the prefix and new tokens 0..t.

        Args:
          kv_lengths: [batch] int32 committed lengths.
          valid: optional [batch, seq] bool; False hides that new token's key
            from every query (padding).
          write: optional [batch, seq] bool; False drops that token's K/V write
            (a finished row, a rejected token).
        """
        offsets = jnp.arange(seq, dtype=jnp.int32)[None, :]
        local = jnp.tril(jnp.ones((seq, seq), bool))[None]
        if valid is not None:
            local = local & valid[:, None, :]
        return cls.window_of(kv_lengths, kv_lengths.astype(jnp.int32)[:, None] + offsets, offsets, local, write=write,
                             backend=backend)

    @classmethod
    def window_of(cls, kv_lengths: jax.Array, positions: jax.Array, offsets: jax.Array, local_mask: jax.Array, *,
                  write: jax.Array | None = None, backend: str = DEFAULT_BACKEND) -> AttentionMetadata:
        """New tokens written inside the window after the prefix, at slots ``kv_lengths + offsets``
        (tree verification: offsets 0..N-1; drafting: each step's own offsets).

        Args:
          kv_lengths: [batch]; positions: [batch, T]; offsets: [batch or 1, T] int32 < W;
          local_mask: [batch, T, W] bool; write: optional [batch] or [batch, T] bool (False: dropped).
        """
        kv_lengths = kv_lengths.astype(jnp.int32)
        slots = kv_lengths[:, None] + offsets.astype(jnp.int32)
        if write is not None:
            keep = write if write.ndim == 2 else write[:, None]
            slots = jnp.where(keep, slots, jnp.iinfo(jnp.int32).max)
        return cls(positions=positions.astype(jnp.int32), slots=slots, kv_lengths=kv_lengths, local_mask=local_mask,
                   backend=backend)

    @classmethod
    def dense(cls, positions: jax.Array, slots: jax.Array, mask: jax.Array, *,
              backend: str = DEFAULT_BACKEND) -> AttentionMetadata:
        """An arbitrary dense mask [batch or 1, T, capacity] over the buffer (no prefix:
        ``kv_lengths`` 0, the window the whole buffer)."""
        batch = positions.shape[0]
        return cls(positions=positions.astype(jnp.int32), slots=slots.astype(jnp.int32),
                   kv_lengths=jnp.zeros((batch,), jnp.int32), local_mask=mask, backend=backend)

    def with_backend(self, backend: str) -> AttentionMetadata:
        return dataclasses.replace(self, backend=backend)

    # ------------------------------------------------------------ dense view

    def dense_mask(self, capacity: int) -> jax.Array:
        """[batch, T, capacity] bool over the buffer after the write: the prefix plus the window.

        Slot s is visible to token t iff ``s < kv_lengths`` or
        ``local_mask[t, s - kv_lengths]`` (for ``0 <= s - kv_lengths < W``).
        """
        batch, seq = self.positions.shape
        width = self.window
        local = jnp.broadcast_to(self.local_mask, (batch, seq, width))
        rel = jnp.arange(capacity, dtype=jnp.int32)[None, None, :] - self.kv_lengths[:, None, None]
        picked = jnp.take_along_axis(local, jnp.broadcast_to(jnp.clip(rel, 0, width - 1), (batch, seq, capacity)),
                                     axis=-1)
        return (rel < 0) | ((rel < width) & picked)
