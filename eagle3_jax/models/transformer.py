"""The decoder-only transformer every supported target is (Flax NNX).

Pre-norm layers of grouped-query attention with RoPE and a SwiGLU MLP,
RMSNorm throughout; the architectures differ only in flags of their config
(docs/architecture.md#targets):

    Qwen3   q/k RMSNorm per head (``qk_norm``), optional attention bias
    Qwen2   biases on q/k/v (``qkv_bias``), no q/k norm
    Llama   ``attention_bias`` on q/k/v/o (usually off), ``llama3`` RoPE scaling

One forward serves prefill, one-token decode and multi-token tree
verification: the caller passes token ids and the forward's
:class:`~eagle3_jax.attention.AttentionMetadata` (positions, write slots, the
committed prefix and the local mask), and each layer goes through
:func:`eagle3_jax.attention.attend`. Module and parameter names mirror the HF
checkpoints (``model.layers.3.self_attn.q_proj``), so the weight mapping is a
short table of renames and transposes (``eagle3_jax/weights/rules.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eagle3_jax.attention import AttentionMetadata, attend
from eagle3_jax.axes import LogicalAxes, constrain, param_metadata
from eagle3_jax.config import TargetConfig
from eagle3_jax.kv_cache import KVCache, pin_row_major
from eagle3_jax.models.layers import DEFAULT_INIT_STD, GatedMLP, RMSNorm, apply_rope, normal_init, rope_tables
from eagle3_jax.models.target import ForwardOutput, new_cache

RESIDUAL_AXES = ("batch", None, "embed")  # [batch, seq, hidden]: rows over the data axis, whole on the tensor axis


def _axes(kernel: LogicalAxes) -> dict:
    """nnx.Linear metadata: the kernel's logical axes ([in, out]) and its bias's (the output axis)."""
    return dict(kernel_metadata=param_metadata(kernel), bias_metadata=param_metadata(kernel[1:]))


class Attention(nnx.Module):
    def __init__(self, cfg: TargetConfig, *, dtype, init_std: float, rngs: nnx.Rngs):
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        kw = dict(dtype=dtype, param_dtype=dtype, kernel_init=normal_init(init_std), rngs=rngs)
        self.q_proj = nnx.Linear(cfg.hidden_size, hq * d, use_bias=cfg.qkv_bias, **kw, **_axes(("embed", "heads")))
        self.k_proj = nnx.Linear(cfg.hidden_size, hkv * d, use_bias=cfg.qkv_bias, **kw, **_axes(("embed", "kv_heads")))
        self.v_proj = nnx.Linear(cfg.hidden_size, hkv * d, use_bias=cfg.qkv_bias, **kw, **_axes(("embed", "kv_heads")))
        self.o_proj = nnx.Linear(hq * d, cfg.hidden_size, use_bias=cfg.o_bias, **kw, **_axes(("heads", "embed")))
        if cfg.qk_norm:  # per head: every tensor shard holds the whole weight
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, axes=(None,))
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, axes=(None,))
        else:
            self.q_norm = self.k_norm = None
        self.cfg = cfg

    def __call__(self, x, cos, sin, cache: KVCache, layer: int, meta: AttentionMetadata):
        """x: [batch, seq, hidden]; cos/sin: [batch, seq, head_dim]. Returns ([batch, seq, hidden], cache)."""
        b, t, _ = x.shape
        cfg = self.cfg
        q = pin_row_major(self.q_proj(x)).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = pin_row_major(self.k_proj(x)).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = pin_row_major(self.v_proj(x)).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, cache = attend(q, k, v, cache, layer, meta)
        return self.o_proj(out.reshape(b, t, -1)), cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TargetConfig, *, dtype, init_std: float, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, axes=("embed",))
        self.self_attn = Attention(cfg, dtype=dtype, init_std=init_std, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, axes=("embed",))
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, init_std=init_std, rngs=rngs,
                            sharded=True)

    def __call__(self, x, cos, sin, cache, layer, meta):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, meta)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


class Backbone(nnx.Module):
    """``model.*`` of the HF checkpoint: embedding, layers, final norm."""

    def __init__(self, cfg: TargetConfig, *, dtype, init_std: float, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                                      embedding_init=normal_init(init_std), rngs=rngs,
                                      embedding_metadata=param_metadata(("vocab", "embed")))
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, init_std=init_std, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, axes=("embed",))


class DecoderLM(nnx.Module):
    """A decoder-only causal LM implementing :class:`~eagle3_jax.models.target.TargetModel`.

    Build one with random weights as ``Qwen3ForCausalLM(cfg, dtype=..., rngs=nnx.Rngs(0))``
    (``init_std`` sets the initializer's scale) or load a checkpoint with
    :func:`eagle3_jax.load_target`.
    """

    def __init__(self, cfg: TargetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, init_std: float = DEFAULT_INIT_STD):
        self.config = cfg
        self.model = Backbone(cfg, dtype=dtype, init_std=init_std, rngs=rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype,
                                      kernel_init=normal_init(init_std), rngs=rngs,
                                      kernel_metadata=param_metadata(("embed", "vocab")))

    @property
    def dtype(self):
        return self.model.embed_tokens.embedding.dtype

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings [batch, seq, hidden] (shared with the EAGLE-3 draft head)."""
        return self.model.embed_tokens(tokens)

    def unembed(self, hidden: jax.Array, ids: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden [..., hidden] -> float32 logits [..., vocab], or [..., len(ids)] for the
        vocabulary entries ``ids`` [n] alone (a draft vocabulary: the other rows of the output layer are not read)."""
        if self.lm_head is None:
            w = self.model.embed_tokens.embedding[...]
            w = w if ids is None else jnp.take(w, ids, axis=0)
            return jnp.einsum("...h,vh->...v", hidden, w, preferred_element_type=jnp.float32)
        w = self.lm_head.kernel[...]
        w = w if ids is None else jnp.take(w, ids, axis=1)
        return jnp.einsum("...h,hv->...v", hidden, w, preferred_element_type=jnp.float32)

    def forward_sequence(self, tokens: jax.Array, valid: jax.Array | None = None, **kwargs) -> ForwardOutput:
        """A forward over whole sequences from position 0 with a fresh cache of their length
        (training, scoring, precomputing features). ``valid`` [batch, seq] hides padding keys;
        ``kwargs`` are those of :meth:`__call__` (feature_layers, logits_indices, return_hidden)."""
        batch, seq = tokens.shape
        cache = new_cache(self.config, batch, seq, self.dtype)
        meta = AttentionMetadata.causal(jnp.zeros((batch,), jnp.int32), seq, valid=valid)
        return self(tokens, cache, meta, **kwargs)

    def __call__(
        self,
        tokens: jax.Array,
        cache: KVCache,
        attention: AttentionMetadata,
        *,
        feature_layers: tuple[int, ...] = (),
        logits_indices: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> ForwardOutput:
        """Runs the target over new tokens against the KV cache.

        Args:
          tokens: [batch, seq] int32 token ids.
          cache: the KV cache; its ``lengths`` are not changed here.
          attention: positions, write slots and what each token sees
            (:class:`~eagle3_jax.attention.AttentionMetadata`, seq = T).
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
        cos, sin = rope_tables(attention.positions, cfg.head_dim, cfg.rope_theta, x.dtype, cfg.rope_scaling)
        captured = {}
        for layer_idx, layer in enumerate(self.model.layers):
            if layer_idx in feature_layers:
                captured[layer_idx] = x
            x, cache = layer(x, cos, sin, cache, layer_idx, attention)
            x = constrain(x, RESIDUAL_AXES)  # on a mesh: after the tensor-parallel all-reduce, as Megatron has it
        features = None
        if feature_layers:  # what the (replicated) draft head reads: whole on the tensor axis
            features = constrain(jnp.concatenate([captured[i] for i in feature_layers], axis=-1), RESIDUAL_AXES)

        rows = x if logits_indices is None else jnp.take_along_axis(x, logits_indices[:, :, None].astype(jnp.int32),
                                                                     axis=1)
        logits = self.unembed(self.model.norm(rows)) if rows.shape[1] else None
        hidden = self.model.norm(x) if return_hidden else None
        return ForwardOutput(logits=logits, cache=cache, features=features, hidden=hidden)
