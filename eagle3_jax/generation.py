"""Host-side generation API: prompts in, tokens and statistics out.

:class:`Generator` validates and pads prompts into length buckets (prompts
whose padded length is the same share one compiled program), picks the cache
capacity, runs the jitted prefill and decode loop, and unpacks the fixed-size
results into one :class:`GenerationOutput` per prompt.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eagle3_jax.compiled import CompiledFunction
from eagle3_jax.decoding import plain
from eagle3_jax.decoding.common import DecodeSettings, finish_reasons
from eagle3_jax.errors import InputError
from eagle3_jax.models.qwen3 import Qwen3ForCausalLM
from eagle3_jax.sampling import SamplingParams

MIN_BUCKET = 16
CAPACITY_ALIGN = 128


def bucket_length(n: int, limit: int | None = None) -> int:
    """The padded prompt length for ``n`` tokens: the next power of two >= max(n, 16), capped at ``limit``."""
    bucket = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return min(bucket, limit) if limit is not None else bucket


@dataclasses.dataclass
class GenerationOutput:
    """One prompt's generation.

    Attributes:
      token_ids: the generated tokens (a final stop token included).
      finish_reason: 'eos' (a stop token) or 'length' (max_new_tokens or a full cache).
      num_target_forwards: target forwards after the prefill.
      prompt_length: prompt tokens.
      prefill_seconds, decode_seconds: wall time of the batch's prefill and
        decode loop (compilation excluded).
      compile_seconds: time spent compiling in this call (0 when reused).
      tokens_per_second: len(token_ids) / (prefill_seconds + decode_seconds).
    """

    token_ids: list[int]
    finish_reason: str
    num_target_forwards: int
    prompt_length: int
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float
    tokens_per_second: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if len(prompts) and all(isinstance(t, (int, np.integer)) for t in prompts):
        prompts = [prompts]  # a single prompt
    if not len(prompts):
        raise InputError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in p]
        if not ids:
            raise InputError(f"prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        out.append(ids)
    return out


def _run_plain(graphdef, settings, state, tokens, lengths, rng, temperature, top_p):
    model = nnx.merge(graphdef, state)
    loop_state = plain.start(model, tokens, lengths, rng, temperature, top_p, settings)
    return loop_state


def _run_plain_loop(graphdef, settings, state, loop_state, temperature, top_p):
    model = nnx.merge(graphdef, state)
    return plain.decode_loop(model, loop_state, temperature, top_p, settings)


_PREFILL = CompiledFunction(_run_plain, num_static=2)
_LOOP = CompiledFunction(_run_plain_loop, num_static=2, donate_argnums=(3,))


def plan_batch(config, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: SamplingParams,
               stop_token_ids: Sequence[int] | None, max_cache_len: int | None,
               cache_dtype) -> tuple[list[list[int]], DecodeSettings, int]:
    """Validates a batch against a model config and picks its static shapes.

    Needs only the config, so callers (the CLI) can reject bad input before
    loading any weights. Returns (prompts as lists, settings, prompt bucket).
    """
    prompts = _validate_prompts(prompts, config.vocab_size)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if max_cache_len is not None and max_cache_len < 2:
        raise InputError(f"max_cache_len must be at least 2, got {max_cache_len}")
    longest = max(len(p) for p in prompts)
    if max_cache_len is not None:
        capacity = max_cache_len
    else:
        if longest >= config.max_position_embeddings:
            raise InputError(f"a prompt of {longest} tokens exceeds the model's context "
                             f"(max_position_embeddings={config.max_position_embeddings})")
        wanted = -(-(bucket_length(longest) + int(max_new_tokens)) // CAPACITY_ALIGN) * CAPACITY_ALIGN
        capacity = max(min(wanted, config.max_position_embeddings), longest + 1)
    if longest + 1 > capacity:
        raise InputError(
            f"a prompt of {longest} tokens does not fit in a KV cache of {capacity} slots "
            f"(need at least {longest + 1}); raise max_cache_len or shorten the prompt"
        )
    stops = config.eos_token_ids if stop_token_ids is None else tuple(int(t) for t in stop_token_ids)
    settings = DecodeSettings(max_new_tokens=int(max_new_tokens), capacity=capacity, greedy=sampling.greedy,
                              top_k=sampling.top_k, stop_token_ids=stops, cache_dtype=jnp.dtype(cache_dtype))
    return prompts, settings, bucket_length(longest, capacity)


class Generator:
    """Plain (non-speculative) generation with a target, compiled once per shape.

    >>> gen = Generator(target)
    >>> [out] = gen.generate([[1, 2, 3]], max_new_tokens=32)
    >>> out.token_ids, out.finish_reason

    Args:
      target: a loaded :class:`Qwen3ForCausalLM`.
      max_cache_len: KV capacity per row; None sizes it from the prompt bucket
        and ``max_new_tokens`` (rounded up to 128, at most the model's
        max_position_embeddings).
      cache_dtype: KV storage dtype (default: the model's dtype).
    """

    def __init__(self, target: Qwen3ForCausalLM, *, max_cache_len: int | None = None, cache_dtype=None):
        self.config = target.config
        self.graphdef, self.state = nnx.split(target)
        self.max_cache_len = max_cache_len
        self.cache_dtype = jnp.dtype(cache_dtype or target.dtype)

    @property
    def num_compiles(self) -> int:
        """Compilations so far by all plain generators (prefill and loop together)."""
        return _PREFILL.num_compiles + _LOOP.num_compiles

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                 sampling: SamplingParams | None = None, seed: int = 0,
                 stop_token_ids: Sequence[int] | None = None) -> list[GenerationOutput]:
        """Generates a continuation for every prompt (a batch of token-id lists).

        Args:
          prompts: token-id lists of any lengths (or one list).
          max_new_tokens: generated tokens per prompt at most.
          sampling: greedy by default.
          seed: PRNG seed for sampling.
          stop_token_ids: tokens that end a row; None uses the model's eos ids,
            () disables stopping.
        """
        sampling = sampling or SamplingParams()
        prompts, settings, bucket = plan_batch(self.config, prompts, max_new_tokens=max_new_tokens,
                                               sampling=sampling, stop_token_ids=stop_token_ids,
                                               max_cache_len=self.max_cache_len, cache_dtype=self.cache_dtype)
        tokens = np.zeros((len(prompts), bucket), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        lengths = np.array([len(p) for p in prompts], np.int32)
        temperature = jnp.float32(sampling.temperature or 1.0)
        top_p = jnp.float32(sampling.top_p)
        rng = jax.random.key(seed)

        t0 = time.perf_counter()
        loop_state, compile_prefill = _PREFILL(self.graphdef, settings, self.state, jnp.asarray(tokens),
                                               jnp.asarray(lengths), rng, temperature, top_p)
        jax.block_until_ready(loop_state)
        prefill_seconds = time.perf_counter() - t0 - compile_prefill
        t1 = time.perf_counter()
        loop_state, compile_loop = _LOOP(self.graphdef, settings, self.state, loop_state, temperature, top_p)
        result = jax.device_get(loop_state.result)
        decode_seconds = time.perf_counter() - t1 - compile_loop

        reasons = finish_reasons(result.finish_reason)
        elapsed = max(prefill_seconds + decode_seconds, 1e-9)
        outputs = []
        for i in range(len(prompts)):
            n = int(result.num_generated[i])
            outputs.append(GenerationOutput(
                token_ids=[int(t) for t in result.tokens[i, :n]],
                finish_reason=reasons[i],
                num_target_forwards=int(result.num_forwards[i]),
                prompt_length=int(lengths[i]),
                prefill_seconds=prefill_seconds,
                decode_seconds=decode_seconds,
                compile_seconds=compile_prefill + compile_loop,
                tokens_per_second=n / elapsed,
            ))
        return outputs


def generate(target: Qwen3ForCausalLM, prompts: Sequence[Sequence[int]], *, max_cache_len: int | None = None,
             **kwargs) -> list[GenerationOutput]:
    """One-shot :meth:`Generator.generate` (compiled programs are still shared across calls)."""
    return Generator(target, max_cache_len=max_cache_len).generate(prompts, **kwargs)
