"""The EAGLE-3 draft head in Flax NNX (SpecForge ``LlamaForCausalLMEagle3``).

Forward (docs/architecture.md#draft-head):

    h = fc(concat(f_low, f_mid, f_high))        # only where the input is target features
    u = concat(input_layernorm(emb), hidden_norm(h))   # embedding first, 2H wide
    h = h + o_proj(attn(u))
    g = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(g))                   # over the draft vocabulary

``g`` (before the final norm) is what a drafting step feeds back as the next
``h``. With ``norm_before_residual`` (a ``speculators`` flag) the residual is
``hidden_norm(h)`` instead of ``h``. Like the target, one forward takes the
head's own static KV cache and the forward's
:class:`~eagle3_jax.attention.AttentionMetadata`, and attends through
:func:`eagle3_jax.attention.attend`, so the same module serves the extend over
target features and the tree steps. Training's unrolled training-time-test
attention plugs in through :meth:`Eagle3DraftHead.forward_with`
(``eagle3_jax/training/ttt_attention.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from eagle3_jax.attention import AttentionMetadata, attend
from eagle3_jax.config import Eagle3Config
from eagle3_jax.kv_cache import KVCache, pin_row_major
from eagle3_jax.models.layers import DEFAULT_INIT_STD, GatedMLP, RMSNorm, apply_rope, normal_init, rope_tables


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

    def __init__(self, cfg: Eagle3Config, *, dtype, init_std: float, rngs: nnx.Rngs):
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        kw = dict(use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=normal_init(init_std), rngs=rngs)
        self.q_proj = nnx.Linear(2 * cfg.hidden_size, hq * d, **kw)
        self.k_proj = nnx.Linear(2 * cfg.hidden_size, hkv * d, **kw)
        self.v_proj = nnx.Linear(2 * cfg.hidden_size, hkv * d, **kw)
        self.o_proj = nnx.Linear(hq * d, cfg.hidden_size, **kw)
        self.cfg = cfg

    def __call__(self, u, cos, sin, attend: AttendFn):
        """u: [batch, seq, 2*hidden]. ``attend(q, k, v) -> (out, state)`` decides
        which keys each query sees (a KV cache, or the training-time-test history)."""
        b, t, _ = u.shape
        cfg = self.cfg
        q = pin_row_major(self.q_proj(u)).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = pin_row_major(self.k_proj(u)).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = pin_row_major(self.v_proj(u)).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, state = attend(q, k, v)
        return self.o_proj(out.reshape(b, t, -1)), state


class Eagle3MidLayer(nnx.Module):
    def __init__(self, cfg: Eagle3Config, *, dtype, init_std: float, rngs: nnx.Rngs):
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Eagle3Attention(cfg, dtype=dtype, init_std=init_std, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, init_std=init_std, rngs=rngs)
        self.norm_before_residual = cfg.norm_before_residual

    def __call__(self, emb, h, cos, sin, attend):
        normed = self.hidden_norm(h)
        u = jnp.concatenate([self.input_layernorm(emb), normed], axis=-1)
        a, state = self.self_attn(u, cos, sin, attend)
        h = (normed if self.norm_before_residual else h) + a
        return h + self.mlp(self.post_attention_layernorm(h)), state


class Eagle3DraftHead(nnx.Module):
    """The draft head. Token embeddings come from the target (``target.embed``)
    unless the head was loaded with its own ``embed_tokens``.

    Build one with random weights as ``Eagle3DraftHead(cfg, dtype=..., rngs=nnx.Rngs(0))``
    or load a checkpoint with :func:`eagle3_jax.load_draft`.
    """

    def __init__(self, cfg: Eagle3Config, *, dtype=jnp.float32, rngs: nnx.Rngs, own_embedding: bool = False,
                 init_std: float = DEFAULT_INIT_STD):
        self.config = cfg
        kw = dict(use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=normal_init(init_std), rngs=rngs)
        self.fc = nnx.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, **kw)
        self.midlayer = Eagle3MidLayer(cfg, dtype=dtype, init_std=init_std, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = nnx.Linear(cfg.hidden_size, cfg.draft_vocab_size, **kw)
        # d2t[i] = target_id - draft_id for draft id i; t2d[t] marks target ids in the draft vocabulary.
        # Both identity-like until a vocabulary map is loaded or built.
        self.d2t = VocabMap(jnp.zeros((cfg.draft_vocab_size,), jnp.int32))
        self.t2d = VocabMap(jnp.arange(cfg.vocab_size) < cfg.draft_vocab_size)
        if own_embedding:
            self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                                          embedding_init=normal_init(init_std), rngs=rngs)
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
        cache: KVCache,
        attention: AttentionMetadata,
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
          cache: the head's KV cache (one layer); lengths are not changed here.
          attention: positions, write slots and what each token sees in the
            head's cache (:class:`~eagle3_jax.attention.AttentionMetadata`).
          hidden_is_features: static; apply ``fc`` to ``hidden`` first.
          logits_indices: [batch, rows] int32 positions whose logits to
            compute; None computes all seq rows (``hidden`` is always returned
            for every position).
        """
        def attend_cache(q, k, v):
            return attend(q, k, v, cache, 0, attention)

        logits, g, cache = self.forward_with(attend_cache, embeds, hidden, attention.positions,
                                             hidden_is_features=hidden_is_features, logits_indices=logits_indices)
        return DraftOutput(logits=logits, hidden=g, cache=cache)

    def forward_with(self, attend_fn: AttendFn, embeds: jax.Array, hidden: jax.Array, positions: jax.Array, *,
                     hidden_is_features: bool, logits_indices: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, Any]:
        """The head's forward with the attention supplied by the caller.

        ``attend_fn(q, k, v) -> (out, state)`` takes the rotated queries
        [batch, seq, q_heads, head_dim] and the new keys and values
        [batch, seq, kv_heads, head_dim] and decides what each query sees (a
        KV cache in :meth:`__call__`; the training-time-test history in
        ``eagle3_jax/training/ttt_attention.py``).

        Returns:
          (logits [batch, rows, draft_vocab] float32, g [batch, seq, hidden], the attend_fn's state).
        """
        cfg = self.config
        h = self.project_features(hidden) if hidden_is_features else hidden.astype(self.dtype)
        emb = embeds.astype(self.dtype)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, h.dtype, cfg.rope_scaling)
        g, state = self.midlayer(emb, h, cos, sin, attend_fn)
        rows = g if logits_indices is None else jnp.take_along_axis(g, logits_indices[:, :, None], axis=1)
        logits = jnp.einsum("...h,hv->...v", self.norm(rows), self.lm_head.kernel[...],
                            preferred_element_type=jnp.float32)
        return logits, g, state


AttendFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]
