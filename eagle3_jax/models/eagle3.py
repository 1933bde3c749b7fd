"""The EAGLE-3 draft head in Flax NNX (SpecForge ``LlamaForCausalLMEagle3``).

Forward (docs/architecture.md#draft-head):

    h = fc(concat(f_low, f_mid, f_high))        # only where the input is target features
    u = concat(input_layernorm(emb), hidden_norm(h))   # embedding first, 2H wide
    h = h + o_proj(attn(u))
    g = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(g))                   # over the draft vocabulary

``g`` (before the final norm) is what a drafting step feeds back as the next
``h``. Like the target, one forward takes explicit positions, the slots where
the new K/V go and a mask over the head's own static KV buffer, so the same
module serves the extend over target features, the tree steps, and the
training-time-test pattern of training (:func:`ttt_mask`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from eagle3_jax.config import Eagle3Config
from eagle3_jax.kv_cache import KVCache
from eagle3_jax.models.layers import (
    MASK_VALUE,
    GatedMLP,
    RMSNorm,
    apply_rope,
    grouped_attention,
    normal_init,
    rope_tables,
)

INIT_STD = 0.02


class VocabMap(nnx.Variable):
    """A non-trainable vocabulary-map buffer (``d2t`` / ``t2d``)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftOutput:
    """What one draft forward returns.

    Attributes:
      logits: [batch, seq, draft_vocab] float32 over the draft vocabulary
        (map an index to a target id with :meth:`Eagle3DraftHead.to_target_ids`).
      hidden: [batch, seq, hidden], ``g`` before the final norm (fed back by the next step).
      cache: the draft cache with the new K/V written (lengths unchanged).
    """

    logits: jax.Array
    hidden: jax.Array
    cache: KVCache


class Eagle3Attention(nnx.Module):
    """Llama attention over the 2H-wide input; no biases, no q/k norm."""

    def __init__(self, cfg: Eagle3Config, *, dtype, rngs: nnx.Rngs):
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        kw = dict(use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=normal_init(INIT_STD), rngs=rngs)
        self.q_proj = nnx.Linear(2 * cfg.hidden_size, hq * d, **kw)
        self.k_proj = nnx.Linear(2 * cfg.hidden_size, hkv * d, **kw)
        self.v_proj = nnx.Linear(2 * cfg.hidden_size, hkv * d, **kw)
        self.o_proj = nnx.Linear(hq * d, cfg.hidden_size, **kw)
        self.cfg = cfg

    def __call__(self, u, cos, sin, attend: "AttendFn"):
        """u: [batch, seq, 2*hidden]. ``attend(q, k, v) -> (out, state)`` decides
        which keys each query sees (a KV cache, or the training-time-test history)."""
        b, t, _ = u.shape
        cfg = self.cfg
        q = self.q_proj(u).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(u).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(u).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, state = attend(q, k, v)
        return self.o_proj(out.reshape(b, t, -1)), state


class Eagle3MidLayer(nnx.Module):
    def __init__(self, cfg: Eagle3Config, *, dtype, rngs: nnx.Rngs):
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Eagle3Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, init_std=INIT_STD, rngs=rngs)

    def __call__(self, emb, h, cos, sin, attend):
        u = jnp.concatenate([self.input_layernorm(emb), self.hidden_norm(h)], axis=-1)
        a, state = self.self_attn(u, cos, sin, attend)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), state


class Eagle3DraftHead(nnx.Module):
    """The draft head. Token embeddings come from the target (``target.embed``)
    unless the head was loaded with its own ``embed_tokens``.

    Build one with random weights as ``Eagle3DraftHead(cfg, dtype=..., rngs=nnx.Rngs(0))``
    or load a checkpoint with :func:`eagle3_jax.load_draft`.
    """

    def __init__(self, cfg: Eagle3Config, *, dtype=jnp.float32, rngs: nnx.Rngs, own_embedding: bool = False):
        self.config = cfg
        kw = dict(use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=normal_init(INIT_STD), rngs=rngs)
        self.fc = nnx.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, **kw)
        self.midlayer = Eagle3MidLayer(cfg, dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = nnx.Linear(cfg.hidden_size, cfg.draft_vocab_size, **kw)
        # d2t[i] = target_id - draft_id for draft id i; t2d[t] marks target ids in the draft vocabulary.
        # Both identity-like until a vocabulary map is loaded or built.
        self.d2t = VocabMap(jnp.zeros((cfg.draft_vocab_size,), jnp.int32))
        self.t2d = VocabMap(jnp.arange(cfg.vocab_size) < cfg.draft_vocab_size)
        if own_embedding:
            self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                                          embedding_init=normal_init(INIT_STD), rngs=rngs)
        else:
            self.embed_tokens = None

    @property
    def dtype(self):
        return self.fc.kernel.dtype

    def to_target_ids(self, draft_ids: jax.Array) -> jax.Array:
        """Draft-vocabulary indices -> target token ids (``draft_id + d2t[draft_id]``)."""
        return draft_ids + self.d2t[...][draft_ids]

    def project_features(self, features: jax.Array) -> jax.Array:
        """Target features [..., 3 * target_hidden] -> draft hidden [..., hidden] (``fc``)."""
        return self.fc(features.astype(self.dtype))

    def __call__(
        self,
        embeds: jax.Array,
        hidden: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        slots: jax.Array,
        mask: jax.Array,
        *,
        hidden_is_features: bool,
        logits_indices: jax.Array | None = None,
    ) -> DraftOutput:
        """One draft forward over new positions.

        Args:
          embeds: [batch, seq, hidden] embeddings of the tokens x_{t+1}
            paired with each position t (the target's embedding table).
          hidden: [batch, seq, 3 * target_hidden] target features f_t when
            ``hidden_is_features`` (the extend), else [batch, seq, hidden], the
            ``g`` of each position's parent step (tree steps).
          positions: [batch, seq] int32 RoPE positions.
          cache: the head's KV cache (one layer); lengths are not changed here.
          slots: [batch, seq] int32 where the new K/V go (outside: dropped).
          mask: [batch, seq, capacity] bool over the buffer after the write.
          hidden_is_features: static; apply ``fc`` to ``hidden`` first.
          logits_indices: [batch, rows] int32 positions whose logits to
            compute; None computes all seq rows (``hidden`` is always returned
            for every position).
        """
        def attend(q, k, v):
            written = cache.write(0, k, v, slots)
            return grouped_attention(q, written.k[0], written.v[0], mask), written

        logits, g, cache = self._forward(embeds, hidden, positions, attend, hidden_is_features, logits_indices)
        return DraftOutput(logits=logits, hidden=g, cache=cache)

    def ttt_step(self, embeds: jax.Array, hidden: jax.Array, positions: jax.Array, history: "TTTHistory",
                 valid: jax.Array, *, hidden_is_features: bool) -> tuple[jax.Array, jax.Array, "TTTHistory"]:
        """One unrolled training-time-test step (SpecForge's attention pattern).

        A query at step j, index t, sees the step-0 keys at valid indices
        s <= t and the key at index t of every step 1..j. This costs one
        [seq, seq] score matrix per step plus a diagonal per earlier step,
        where the equivalent :func:`ttt_mask` over a cache would score all
        ``ttt_length * seq`` keys.

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

        return self._forward(embeds, hidden, positions, attend, hidden_is_features, None)

    def _forward(self, embeds, hidden, positions, attend, hidden_is_features, logits_indices):
        cfg = self.config
        h = self.project_features(hidden) if hidden_is_features else hidden.astype(self.dtype)
        emb = embeds.astype(self.dtype)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
        g, state = self.midlayer(emb, h, cos, sin, attend)
        rows = g if logits_indices is None else jnp.take_along_axis(g, logits_indices[:, :, None], axis=1)
        logits = jnp.einsum("...h,hv->...v", self.norm(rows), self.lm_head.kernel[...],
                            preferred_element_type=jnp.float32)
        return logits, g, state


AttendFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TTTHistory:
    """Keys and values of the training-time-test steps run so far.

    Attributes:
      keys, values: one [batch, kv_heads, seq, head_dim] array per step, step 0 first.
    """

    keys: tuple = ()
    values: tuple = ()

    def append(self, k: jax.Array, v: jax.Array) -> "TTTHistory":
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
