"""Plain (one token per target forward) decoding as pure, jittable functions.

``start`` prefills the prompts and picks the first token; ``decode_loop``
feeds each new token back (one ``lax.while_loop``, ``decoding/loop.py``) until
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

from eagle3_jax.attention import AttentionMetadata
from eagle3_jax.axes import ROWS, SHARED, axes_field
from eagle3_jax.decoding.common import (
    DecodeResult,
    DecodeSettings,
    RuntimeParams,
    finish_reasons,
    nonfinite_rows,
    prefill,
)
from eagle3_jax.decoding.loop import run_loop
from eagle3_jax.kv_cache import KVCache
from eagle3_jax.models.target import TargetModel
from eagle3_jax.sampling import next_keys, row_keys, select_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PlainLoopState:
    """Carry of the plain decode loop.

    Attributes:
      cache: target KV cache; lengths = prompt + generated - 1 (the newest
        token's K/V is written by the next step).
      last_token: [batch] int32, the newest generated token.
      result: tokens and counters so far.
      rng: [batch] PRNG keys for sampling, one per row (``sampling.row_keys``).
      iterations: int32 loop iterations run so far (for chunked streaming).
    """

    cache: KVCache
    last_token: jax.Array = axes_field(ROWS)
    result: DecodeResult
    rng: jax.Array = axes_field(ROWS)
    iterations: jax.Array = axes_field(SHARED)


def start(model: TargetModel, tokens: jax.Array, prompt_lengths: jax.Array, rng: jax.Array,
          params: RuntimeParams, settings: DecodeSettings) -> PlainLoopState:
    """Prefills the prompts and selects the first token of every row.

    Args:
      tokens: [batch, prompt_bucket] int32, right-padded prompts.
      prompt_lengths: [batch] int32, true prompt lengths (>= 1).
      rng: a PRNG key (row i draws with ``fold_in(rng, i)``) or [batch] keys, one per row.
    """
    logits, cache, _ = prefill(model, tokens, prompt_lengths, settings)
    rng, sub = next_keys(row_keys(rng, tokens.shape[0]), settings)
    first = select_tokens(logits, sub, params.temperature, params.top_p, greedy=settings.greedy, top_k=settings.top_k,
                          rows=params.rows)
    result = DecodeResult.start(first, settings, prompt_lengths, params, nonfinite=nonfinite_rows(logits))
    return PlainLoopState(cache=cache, last_token=first, result=result, rng=rng, iterations=jnp.zeros((), jnp.int32))


def step(model: TargetModel, state: PlainLoopState, params: RuntimeParams,
         settings: DecodeSettings) -> PlainLoopState:
    """One target forward for every unfinished row; finished rows are left untouched.

    A row whose logits are not finite appends nothing and finishes with 'nonfinite'.
    """
    cache, result = state.cache, state.result
    active = result.finish_reason == 0
    meta = AttentionMetadata.causal(cache.lengths, 1, write=active[:, None], backend=settings.attention)
    out = model(state.last_token[:, None], cache, meta)  # finished rows write nothing
    rng, sub = next_keys(state.rng, settings)
    token = select_tokens(out.logits[:, 0], sub, params.temperature, params.top_p, greedy=settings.greedy,
                          top_k=settings.top_k, rows=params.rows)
    cache = out.cache.with_lengths(cache.lengths + active)
    result = result.append(token[:, None], active.astype(jnp.int32), settings, params,
                           forwards=active.astype(jnp.int32), nonfinite=nonfinite_rows(out.logits))
    return PlainLoopState(cache=cache, last_token=jnp.where(active, token, state.last_token), result=result, rng=rng,
                          iterations=state.iterations + 1)


def decode_loop(model: TargetModel, state: PlainLoopState, params: RuntimeParams, settings: DecodeSettings,
                max_iterations: jax.Array | None = None) -> PlainLoopState:
    """Runs :func:`step` until every row has finished (or ``max_iterations`` more steps ran, for streaming)."""
    return run_loop(lambda s: step(model, s, params, settings), state, max_iterations)


def generate(model: TargetModel, tokens: jax.Array, prompt_lengths: jax.Array, rng: jax.Array,
             params: RuntimeParams, settings: DecodeSettings) -> DecodeResult:
    """Prefill plus the decode loop: the whole plain generation as one pure function."""
    state = start(model, tokens, prompt_lengths, rng, params, settings)
    return decode_loop(model, state, params, settings).result


__all__ = ["PlainLoopState", "start", "step", "decode_loop", "generate", "finish_reasons"]
