"""Building blocks shared by the targets and the EAGLE-3 draft head.

Numerics follow HF ``modeling_qwen3.py`` / ``modeling_llama.py``
(docs/architecture.md#numerics): RMSNorm in float32 then cast back before the
weight multiply; RoPE with the ``rotate_half`` convention, its tables in
float32 cast to the activation dtype. Attention itself is
``eagle3_jax/attention``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from eagle3_jax.axes import LogicalAxes, param_metadata
from eagle3_jax.config import RopeScaling

DEFAULT_INIT_STD = 0.02  # the initializer's standard deviation for new (untrained) weights


def normal_init(std: float):
    return nnx.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
    """``weight * (x / rms(x))`` with the normalisation computed in float32.

    ``axes``: the weight's logical axes on a device mesh (``eagle3_jax/axes.py``), or None (never sharded: the
    draft head's)."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, axes: LogicalAxes | None = None):
        self.weight = nnx.Param(jnp.ones((dim,), dtype=dtype), **(param_metadata(axes) if axes else {}))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.weight[...] * normed


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """``1 / theta ** (2i / head_dim)`` for i < head_dim/2, in float32, then scaled.  # [head_dim // 2]

    ``llama3`` scaling (HF ``_compute_llama3_parameters``): with
    L = original_max_position_embeddings, frequencies whose wavelength
    2*pi/f exceeds L / low_freq_factor are divided by ``factor``; those
    below L / high_freq_factor are kept; in between,
    ``(1 - s) * f / factor + s * f`` with ``s = (L / wavelength - low) / (high - low)``.
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (jnp.float32(theta) ** exponents)
    if scaling is None:
        return inv_freq
    old = float(scaling.original_max_position_embeddings)
    low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return jnp.where(medium, smoothed, scaled).astype(jnp.float32)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype,
                scaling: RopeScaling | None = None) -> tuple[jax.Array, jax.Array]:
    """cos and sin for explicit positions.

    Args:
      positions: [batch, seq] int32 absolute positions.
      scaling: optional RoPE scaling (``llama3``).
    Returns:
      (cos, sin), each [batch, seq, head_dim] in ``dtype`` (computed in float32).
    """
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta, scaling)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` [batch, seq, heads, head_dim] by tables [batch, seq, head_dim] (rotate_half)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class GatedMLP(nnx.Module):
    """``down(silu(gate(x)) * up(x))``.

    ``sharded``: declare the kernels' logical axes (a target's MLP: columns over the tensor axis); the
    draft head's MLP declares none (replicated)."""

    def __init__(self, hidden: int, intermediate: int, *, dtype, init_std: float, rngs: nnx.Rngs,
                 sharded: bool = False):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=normal_init(init_std), rngs=rngs)
        up_axes = dict(kernel_metadata=param_metadata(("embed", "mlp"))) if sharded else {}
        down_axes = dict(kernel_metadata=param_metadata(("mlp", "embed"))) if sharded else {}
        self.gate_proj = nnx.Linear(hidden, intermediate, **kw, **up_axes)
        self.up_proj = nnx.Linear(hidden, intermediate, **kw, **up_axes)
        self.down_proj = nnx.Linear(intermediate, hidden, **kw, **down_axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
