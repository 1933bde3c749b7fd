"""Building blocks shared by the Qwen3 target and the EAGLE-3 draft head.

Numerics follow HF ``modeling_qwen3.py`` (docs/architecture.md#numerics): RMSNorm in float32
then cast back before the weight multiply; RoPE with the ``rotate_half``
convention, its tables in float32 cast to the activation dtype; softmax in
float32; scale ``head_dim ** -0.5``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Masked attention scores use a large finite value, not -inf, so that a row
# with nothing visible (a padding row) yields a uniform softmax, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def normal_init(std: float):
    return nnx.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
    """``weight * (x / rms(x))`` with the normalisation computed in float32."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype=dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.weight[...] * normed


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
    """``1 / theta ** (2i / head_dim)`` for i < head_dim/2, in float32.  # [head_dim // 2]"""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.float32(theta) ** exponents)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin for explicit positions.

    Args:
      positions: [batch, seq] int32 absolute positions.
    Returns:
      (cos, sin), each [batch, seq, head_dim] in ``dtype`` (computed in float32).
    """
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` [batch, seq, heads, head_dim] by tables [batch, seq, head_dim] (rotate_half)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax attention with grouped KV heads.

    Args:
      q: [batch, seq, q_heads, head_dim] queries (already rotated).
      k, v: [batch, kv_heads, kv_len, head_dim]; q_heads is a multiple of kv_heads.
      mask: [batch, seq, kv_len] bool, True where a query may attend.
    Returns:
      [batch, seq, q_heads, head_dim] in q's dtype.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(q.dtype))
    return out.reshape(b, t, hq, d)


class GatedMLP(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, *, dtype, init_std: float, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=normal_init(init_std), rngs=rngs)
        self.gate_proj = nnx.Linear(hidden, intermediate, **kw)
        self.up_proj = nnx.Linear(hidden, intermediate, **kw)
        self.down_proj = nnx.Linear(intermediate, hidden, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
