"""Token selection: greedy, and sampling with temperature, top-k and top-p.

The order of the filters is HF's: temperature, then top-k, then top-p. Greedy
decoding and ``top_k`` change the compiled program and are static;
``temperature`` and ``top_p`` are traced arrays, so changing them does not
recompile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from eagle3_jax.checks import check_int, check_real

# top-k beyond this is pointless and costs a sort of that width (2**24 exceeds every real vocabulary).
MAX_TOP_K = 2**24


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature == 0`` means greedy (argmax).

    Attributes:
      temperature: softmax temperature; 0 selects greedy decoding.
      top_p: nucleus sampling, keep the smallest set of tokens whose
        probability reaches top_p (1.0 disables it).
      top_k: keep only the k most likely tokens (0 disables it).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        # Normalised to Python numbers: the dataclass is hashed into compile-cache keys.
        object.__setattr__(self, "temperature", check_real("temperature", self.temperature, minimum=0.0))
        object.__setattr__(self, "top_p", check_real("top_p", self.top_p, minimum=0.0, maximum=1.0,
                                                     open_minimum=True))
        object.__setattr__(self, "top_k", check_int("top_k", self.top_k, minimum=0, maximum=MAX_TOP_K))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: int) -> jax.Array:
    """Temperature-scaled logits with everything outside top-k / top-p set to -inf.

    Args:
      logits: [..., vocab] float32.
      temperature, top_p: scalars or arrays broadcastable to logits[..., :1].
      top_k: static; 0 keeps the whole vocabulary.
    Returns:
      [..., vocab] float32; ``softmax`` of it is the sampling distribution.
    """
    logits = logits.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        ranked = jax.lax.top_k(logits, top_k)[0]  # [..., top_k], descending
        logits = jnp.where(logits < ranked[..., -1:], -jnp.inf, logits)
    else:
        ranked = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p  # the top token is always kept
    kept = jnp.sum(keep, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def select_tokens(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                  greedy: bool, top_k: int) -> jax.Array:
    """Next tokens [...] int32 from logits [..., vocab]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_p, top_k)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
