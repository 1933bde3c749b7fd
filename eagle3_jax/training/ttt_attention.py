"""The training-time-test attention of EAGLE-3 training (SpecForge's pattern).

Training unrolls the draft ``ttt_length`` steps over whole sequences. A query
at step j, index t, sees the step-0 keys at valid indices s <= t and the key
at index t of every step 1..j. :func:`ttt_step` computes that with one
[seq, seq] score matrix per step plus a diagonal per earlier step
(:func:`ttt_attention`); :func:`ttt_mask` is the same pattern as a dense mask
over a cache of ``ttt_length * seq`` slots (the form the tests compare with).
Inference never uses this: it attends through ``eagle3_jax.attention``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from eagle3_jax.attention import MASK_VALUE
from eagle3_jax.models.eagle3 import Eagle3DraftHead


def ttt_step(head: Eagle3DraftHead, embeds: jax.Array, hidden: jax.Array, positions: jax.Array,
             history: TTTHistory, valid: jax.Array, *, hidden_is_features: bool
             ) -> tuple[jax.Array, jax.Array, TTTHistory]:
    """One unrolled training-time-test step of ``head``.

    Args:
      embeds: [batch, seq, hidden] embeddings of the tokens paired with each index.
      hidden: target features (step 0, ``hidden_is_features``) or the previous step's ``g``.
      positions: [batch, seq] int32 (the base positions plus the step index).
      history: the K/V of the earlier steps (``TTTHistory()`` at step 0).
      valid: [batch, seq] bool, False at padding.
    Returns:
      (logits [batch, seq, draft_vocab] float32, g, history with this step's K/V).
    """
    def attend(q, k, v):
        new = history.append(k, v)
        return ttt_attention(q, new, valid), new

    return head.forward_with(attend, embeds, hidden, positions, hidden_is_features=hidden_is_features)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TTTHistory:
    """Keys and values of the training-time-test steps run so far.

    Attributes:
      keys, values: one [batch, kv_heads, seq, head_dim] array per step, step 0 first.
    """

    keys: tuple = ()
    values: tuple = ()

    def append(self, k: jax.Array, v: jax.Array) -> TTTHistory:
        """Adds one step's K/V, given as [batch, seq, kv_heads, head_dim]."""
        return TTTHistory(self.keys + (k.transpose(0, 2, 1, 3),), self.values + (v.transpose(0, 2, 1, 3),))


def ttt_attention(q: jax.Array, history: TTTHistory, valid: jax.Array) -> jax.Array:
    """Attention of step len(history)-1 under the training-time-test pattern.

    Args:
      q: [batch, seq, q_heads, head_dim] (rotated).
      history: K/V of steps 0..j, each [batch, kv_heads, seq, head_dim].
      valid: [batch, seq] bool; invalid step-0 keys are hidden.
    Returns:
      [batch, seq, q_heads, head_dim] in q's dtype.
    """
    b, t, hq, d = q.shape
    k0, v0 = history.keys[0], history.values[0]
    hkv = k0.shape[1]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scale = d ** -0.5
    causal = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]  # [batch, query, key]
    s0 = jnp.einsum("btkgd,bksd->bkgts", qg, k0.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    s0 = jnp.where(causal[:, None, None], s0, MASK_VALUE)
    diag = [jnp.einsum("btkgd,bktd->bkgt", qg, ki.astype(q.dtype), preferred_element_type=jnp.float32)[..., None]
            * scale for ki in history.keys[1:]]
    probs = jax.nn.softmax(jnp.concatenate([s0, *diag], axis=-1), axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs[..., :t], v0.astype(q.dtype))
    for i, vi in enumerate(history.values[1:]):
        out = out + jnp.einsum("bkgt,bktd->btkgd", probs[..., t + i], vi.astype(q.dtype))
    return out.reshape(b, t, hq, d)


def ttt_mask(seq: int, step: int, ttt_length: int, valid: jax.Array | None = None) -> jax.Array:
    """The training-time-test attention pattern for unrolled step ``step``.

    The K/V of step i at sequence index s sit at slot ``i * seq + s``. A query
    at step j, index t, attends causally to step-0 keys (s <= t) and to the
    same-index key of steps 1..j (s == t); nothing else.

    Args:
      valid: optional [batch, seq] bool; keys at invalid (padding) indices are hidden.
    Returns:
      [batch or 1, seq, ttt_length * seq] bool.
    """
    t = jnp.arange(seq)[:, None]
    s = jnp.arange(seq)[None, :]
    blocks = [(s <= t) if i == 0 else ((s == t) & (i <= step)) for i in range(ttt_length)]
    mask = jnp.concatenate(blocks, axis=1)[None]
    if valid is not None:
        mask = mask & jnp.tile(valid, (1, ttt_length))[:, None, :]
    return mask
