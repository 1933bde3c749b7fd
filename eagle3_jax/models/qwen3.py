"""The Qwen3 (and Qwen2) target model in Flax NNX.

One forward serves prefill, one-token decode and multi-token tree
verification: the caller passes token ids, explicit positions, the slots where
the new tokens' K/V go, and a mask over the whole KV buffer (see
``eagle3_jax.kv_cache``). Module and parameter names mirror the HF checkpoint
(``model.layers.3.self_attn.q_proj``), so the weight mapping is a short table
of renames and transposes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from eagle3_jax.config import Qwen3Config
from eagle3_jax.kv_cache import KVCache, causal_mask
from eagle3_jax.models.layers import GatedMLP, RMSNorm, apply_rope, grouped_attention, normal_init, rope_tables

INIT_STD = 0.02


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    """What one target forward returns.

    Attributes:
      logits: [batch, rows, vocab] float32, for every input position (rows =
        seq) or only the positions asked for with ``logits_indices``; None when
        ``logits_indices`` has zero rows.
      cache: the cache with the new tokens' K/V written (lengths unchanged).
      features: [batch, seq, len(feature_layers) * hidden] hidden states at the
        inputs of the requested layers, concatenated in the order asked; None
        when no layers were requested.
      hidden: [batch, seq, hidden] the final-normed hidden states of every
        position, whatever ``logits_indices`` selects (only with
        ``return_hidden``; what offline training stores).
    """

    logits: jax.Array | None
    cache: KVCache
    features: jax.Array | None
    hidden: jax.Array | None = None


class Qwen3Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        kw = dict(dtype=dtype, param_dtype=dtype, kernel_init=normal_init(INIT_STD), rngs=rngs)
        self.q_proj = nnx.Linear(cfg.hidden_size, hq * d, use_bias=cfg.qkv_bias, **kw)
        self.k_proj = nnx.Linear(cfg.hidden_size, hkv * d, use_bias=cfg.qkv_bias, **kw)
        self.v_proj = nnx.Linear(cfg.hidden_size, hkv * d, use_bias=cfg.qkv_bias, **kw)
        self.o_proj = nnx.Linear(hq * d, cfg.hidden_size, use_bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.cfg = cfg

    def __call__(self, x, cos, sin, cache: KVCache, layer: int, slots, mask):
        """x: [batch, seq, hidden]; cos/sin: [batch, seq, head_dim]; slots: [batch, seq];
        mask: [batch, seq, capacity]. Returns ([batch, seq, hidden], cache)."""
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = cache.write(layer, k, v, slots)
        out = grouped_attention(q, cache.k[layer], cache.v[layer], mask)
        return self.o_proj(out.reshape(b, t, -1)), cache


class Qwen3DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Qwen3Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, init_std=INIT_STD, rngs=rngs)

    def __call__(self, x, cos, sin, cache, layer, slots, mask):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, slots, mask)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


class Qwen3Model(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                                      embedding_init=normal_init(INIT_STD), rngs=rngs)
        self.layers = nnx.List([Qwen3DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


class Qwen3ForCausalLM(nnx.Module):
    """Qwen3 / Qwen2 causal LM.

    Build one with random weights as ``Qwen3ForCausalLM(cfg, dtype=..., rngs=nnx.Rngs(0))``
    or load a checkpoint with :func:`eagle3_jax.load_target`.
    """

    def __init__(self, cfg: Qwen3Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.model = Qwen3Model(cfg, dtype=dtype, rngs=rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype,
                                      kernel_init=normal_init(INIT_STD), rngs=rngs)

    @property
    def dtype(self):
        return self.model.embed_tokens.embedding.dtype

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings [batch, seq, hidden] (shared with the EAGLE-3 draft head)."""
        return self.model.embed_tokens(tokens)

    def unembed(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [..., hidden] -> float32 logits [..., vocab]."""
        if self.lm_head is None:
            w = self.model.embed_tokens.embedding[...]
            return jnp.einsum("...h,vh->...v", hidden, w, preferred_element_type=jnp.float32)
        w = self.lm_head.kernel[...]
        return jnp.einsum("...h,hv->...v", hidden, w, preferred_element_type=jnp.float32)

    def forward_sequence(self, tokens: jax.Array, valid: jax.Array | None = None, **kwargs) -> ForwardOutput:
        """A forward over whole sequences from position 0 with a fresh cache of their length
        (training, scoring, precomputing features). ``valid`` [batch, seq] hides padding keys;
        ``kwargs`` are those of :meth:`__call__` (feature_layers, logits_indices, return_hidden)."""
        batch, seq = tokens.shape
        cfg = self.config
        cache = KVCache.create(num_layers=cfg.num_hidden_layers, batch=batch, capacity=seq,
                               kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=self.dtype)
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        mask = causal_mask(jnp.zeros((batch,), jnp.int32), seq, seq)
        if valid is not None:
            mask = mask & valid[:, None, :]
        return self(tokens, positions, cache, positions, mask, **kwargs)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        slots: jax.Array,
        mask: jax.Array,
        *,
        feature_layers: tuple[int, ...] = (),
        logits_indices: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> ForwardOutput:
        """Runs the target over new tokens against the KV cache.

        Args:
          tokens: [batch, seq] int32 token ids.
          positions: [batch, seq] int32 RoPE positions.
          cache: the KV cache; its ``lengths`` are not changed here.
          slots: [batch, seq] int32, where each token's K/V is written; slots
            outside the buffer are dropped.
          mask: [batch, seq, capacity] bool over the buffer *after* the write,
            True where a token may attend (its own slot included).
          feature_layers: static; return the hidden states at the inputs of
            these layers (HF ``output_hidden_states`` indices, 0 = embeddings).
          logits_indices: [batch, rows] int32 positions (into seq) whose logits
            to compute; None computes all seq rows.
          return_hidden: static; also return the final-normed hidden states.
        """
        cfg = self.config
        for i in feature_layers:
            if not 0 <= i < cfg.num_hidden_layers:
                raise ValueError(f"feature layer {i} is out of range [0, {cfg.num_hidden_layers})")
        x = self.embed(tokens)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        captured = {}
        for layer_idx, layer in enumerate(self.model.layers):
            if layer_idx in feature_layers:
                captured[layer_idx] = x
            x, cache = layer(x, cos, sin, cache, layer_idx, slots, mask)
        features = jnp.concatenate([captured[i] for i in feature_layers], axis=-1) if feature_layers else None

        rows = x if logits_indices is None else jnp.take_along_axis(x, logits_indices[:, :, None].astype(jnp.int32),
                                                                     axis=1)
        logits = self.unembed(self.model.norm(rows)) if rows.shape[1] else None
        hidden = self.model.norm(x) if return_hidden else None
        return ForwardOutput(logits=logits, cache=cache, features=features, hidden=hidden)
