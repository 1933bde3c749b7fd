"""Plain (one token per target forward) decoding as pure, jittable functions.

``prefill`` runs the prompt through the target and picks the first token;
``decode_loop`` is one ``lax.while_loop`` that feeds each new token back until
every row is done. A row whose logits are not finite (NaN / inf: broken
weights or a numeric blow-up) finishes with 'nonfinite' without the token
chosen from them. Both take the model as an NNX module (merge it from
``graphdef, state`` inside your own ``jax.jit``), so they also run under an
outer jit; :class:`eagle3_jax.generation.Generator` wraps them for host use.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from eagle3_jax.decoding.common import (DecodeResult, DecodeSettings, RuntimeParams, finish_reasons, nonfinite_rows,
                                        prefill)
from eagle3_jax.kv_cache import KVCache, causal_mask
from eagle3_jax.models.qwen3 import Qwen3ForCausalLM
from eagle3_jax.sampling import select_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PlainLoopState:
    """Carry of the plain decode loop.

    Attributes:
      cache: target KV cache; lengths = prompt + generated - 1 (the newest
        token's K/V is written by the next step).
      last_token: [batch] int32, the newest generated token.
      result: tokens and counters so far.
      rng: PRNG key for sampling.
      iterations: int32 loop iterations run so far (for chunked streaming).
    """

    cache: KVCache
    last_token: jax.Array
    result: DecodeResult
    rng: jax.Array
    iterations: jax.Array


def start(model: Qwen3ForCausalLM, tokens: jax.Array, prompt_lengths: jax.Array, rng: jax.Array,
          params: RuntimeParams, settings: DecodeSettings) -> PlainLoopState:
    """Prefills the prompts and selects the first token of every row.

    Args:
      tokens: [batch, prompt_bucket] int32, right-padded prompts.
      prompt_lengths: [batch] int32, true prompt lengths (>= 1).
    """
    logits, cache, _ = prefill(model, tokens, prompt_lengths, settings)
    rng, sub = jax.random.split(rng)
    first = select_tokens(logits, sub, params.temperature, params.top_p, greedy=settings.greedy, top_k=settings.top_k)
    result = DecodeResult.start(first, settings, prompt_lengths, params.stop_ids, nonfinite=nonfinite_rows(logits))
    return PlainLoopState(cache=cache, last_token=first, result=result, rng=rng, iterations=jnp.zeros((), jnp.int32))


def step(model: Qwen3ForCausalLM, state: PlainLoopState, params: RuntimeParams,
         settings: DecodeSettings) -> PlainLoopState:
    """One target forward for every unfinished row; finished rows are left untouched.

    A row whose logits are not finite appends nothing and finishes with 'nonfinite'.
    """
    cache, result = state.cache, state.result
    active = result.finish_reason == 0
    capacity = cache.capacity
    slots = jnp.where(active, cache.lengths, capacity)[:, None]  # finished rows write nothing
    out = model(state.last_token[:, None], cache.lengths[:, None], cache, slots,
                causal_mask(cache.lengths, 1, capacity))
    rng, sub = jax.random.split(state.rng)
    token = select_tokens(out.logits[:, 0], sub, params.temperature, params.top_p, greedy=settings.greedy,
                          top_k=settings.top_k)
    cache = out.cache.with_lengths(cache.lengths + active)
    result = result.append(token[:, None], active.astype(jnp.int32), settings, params.stop_ids,
                           forwards=active.astype(jnp.int32), nonfinite=nonfinite_rows(out.logits))
    return PlainLoopState(cache=cache, last_token=jnp.where(active, token, state.last_token), result=result, rng=rng,
                          iterations=state.iterations + 1)


def decode_loop(model: Qwen3ForCausalLM, state: PlainLoopState, params: RuntimeParams, settings: DecodeSettings,
                max_iterations: jax.Array | None = None) -> PlainLoopState:
    """Runs :func:`step` in a ``lax.while_loop`` until every row has finished
    (or ``max_iterations`` more steps ran, for streaming)."""
    stop_at = state.iterations + (jnp.iinfo(jnp.int32).max // 2 if max_iterations is None else max_iterations)

    def cond(s):
        return jnp.any(s.result.finish_reason == 0) & (s.iterations < stop_at)

    return jax.lax.while_loop(cond, lambda s: step(model, s, params, settings), state)


def generate(model: Qwen3ForCausalLM, tokens: jax.Array, prompt_lengths: jax.Array, rng: jax.Array,
             params: RuntimeParams, settings: DecodeSettings) -> DecodeResult:
    """Prefill plus the decode loop: the whole plain generation as one pure function."""
    state = start(model, tokens, prompt_lengths, rng, params, settings)
    return decode_loop(model, state, params, settings).result


__all__ = ["PlainLoopState", "start", "step", "decode_loop", "generate", "finish_reasons"]
