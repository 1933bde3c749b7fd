"""Planning a generation before anything runs: prompts checked, static shapes chosen, memory checked.

Needs only the model's config, so callers (the CLI) can reject bad input
before loading any weights. The shapes chosen here are the compiled
programs' static ones: the prompt bucket (:func:`bucket_length`: prompts
whose padded length is the same share one program), the KV capacity and the
result buffer (:func:`plan_batch`), and the memory they need on the device
(:func:`check_memory`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from eagle3_jax.attention import DEFAULT_BACKEND
from eagle3_jax.decoding.common import ROW_STOP_SLOTS, DecodeSettings, RuntimeParams
from eagle3_jax.decoding.speculative import cache_headroom
from eagle3_jax.decoding.tree import TreeSpec
from eagle3_jax.errors import InputError
from eagle3_jax.memory import check_generation_memory
from eagle3_jax.sampling import SamplingParams
from eagle3_jax.sharding import ShardingPlan
from eagle3_jax.validation import check_int, check_token_ids, is_int

MIN_BUCKET = 16
CAPACITY_ALIGN = 128


def bucket_length(n: int, limit: int | None = None) -> int:
    """The padded prompt length for ``n`` tokens: the next power of two >= max(n, 16), capped at ``limit``."""
    bucket = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return min(bucket, limit) if limit is not None else bucket


PROMPT_KINDS = ("prompts must be text, a list of chat messages [{'role': 'user', 'content': '...'}] or token ids, "
                "or a list of those (a batch, e.g. a list of token-id lists)")


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """Prompts as lists of ints: a batch of token-id sequences, or one sequence."""
    if isinstance(prompts, np.ndarray):
        if prompts.ndim not in (1, 2):
            raise InputError(f"prompts must be a list of token-id lists, got an array of shape {list(prompts.shape)}")
        prompts = prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise InputError(f"{PROMPT_KINDS}; got {type(prompts).__name__}")
    if not len(prompts):
        raise InputError("no prompts given")
    if all(is_int(t) for t in prompts):
        prompts = [prompts]  # a single prompt
    return [check_token_ids(f"prompt {i}", p, vocab_size) for i, p in enumerate(prompts)]


def check_stop_ids(stop_token_ids: Any, vocab_size: int) -> tuple[int, ...] | None:
    if stop_token_ids is None:
        return None
    if is_int(stop_token_ids):
        stop_token_ids = [stop_token_ids]
    return tuple(check_token_ids("stop_token_ids", stop_token_ids, vocab_size, allow_empty=True))


CACHE_DTYPES = ("float32", "bfloat16", "float16")


def check_cache_dtype(dtype: Any) -> jnp.dtype:
    """A floating KV storage dtype: float32, bfloat16 or float16 (integer caches would change the tokens)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in CACHE_DTYPES:
        raise InputError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
    return dt


def capacity_bucket(wanted: int, context: int) -> int:
    """KV slots for ``wanted`` of them: the smallest of 128 x (1, 2, 3, 4, 6, 8, 12, 16, 24, ...) -- the powers
    of two and the points halfway between them, so at most a third of it goes unused -- that holds them,
    capped at ``context``. Generations whose prompt bucket plus ``max_new_tokens`` fall in one bucket share
    one compiled program."""
    units = -(-wanted // CAPACITY_ALIGN)
    size = 1
    while size < units:
        size += max(1, size // 2) if size & (size - 1) == 0 else size // 3  # 1, 2, 3, 4, 6, 8, 12, ...
    return min(size * CAPACITY_ALIGN, context)


def program_settings(capacity: int, cache_dtype, attention: str = DEFAULT_BACKEND) -> DecodeSettings:
    """The static settings of the programs the library and the server run, for a cache of ``capacity`` slots.

    Everything a call may vary is a runtime value of these programs (:class:`RuntimeParams.per_row`):
    greedy or sampling, temperature, top-p, top-k, the stop tokens and ``max_new_tokens`` per row; the
    result buffers hold what the cache can (``capacity - 1`` tokens), so only the cache's size, its dtype,
    the attention backend, the batch's rows and the prompt bucket are compiled in.
    """
    return DecodeSettings(max_new_tokens=capacity - 1, capacity=capacity, greedy=False, top_k=0,
                          cache_dtype=check_cache_dtype(cache_dtype), attention=attention)


def row_params(rows: int, sampling: SamplingParams, stop_ids: Sequence[int], max_new_tokens: int) -> RuntimeParams:
    """The runtime values of :func:`program_settings`' programs for ``rows`` rows that share one request's
    settings (the library's batch; the server gives each row its own)."""
    return RuntimeParams.per_row([sampling.temperature] * rows, [sampling.top_p] * rows, [sampling.top_k] * rows,
                                 [list(stop_ids)] * rows, [max_new_tokens] * rows, stop_slots=ROW_STOP_SLOTS)


def plan_batch(config, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: SamplingParams,
               stop_token_ids: Sequence[int] | None, max_cache_len: int | None,
               cache_dtype, attention: str = DEFAULT_BACKEND, rows: int | None = None,
               ) -> tuple[list[list[int]], DecodeSettings, RuntimeParams, int]:
    """Validates a batch against a model config and picks its static shapes.

    Needs only the config, so callers (the CLI) can reject bad input before
    loading any weights. ``max_cache_len`` is at most the model's context
    (``max_position_embeddings``); None picks a :func:`capacity_bucket` for the
    prompt bucket plus ``max_new_tokens``. The settings are
    :func:`program_settings`' (result buffers sized by what the cache can hold,
    so a huge ``max_new_tokens`` costs nothing: a row stops with 'length' when
    its cache is full); sampling, stop tokens and ``max_new_tokens`` are
    runtime values, for ``rows`` rows (default: one per prompt). Returns
    (prompts as lists, static settings, runtime parameters, prompt bucket).
    """
    if not isinstance(sampling, SamplingParams):
        raise InputError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    prompts = validate_prompts(prompts, config.vocab_size)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
    context = config.max_position_embeddings
    if max_cache_len is not None:
        max_cache_len = check_int("max_cache_len", max_cache_len, minimum=2, maximum=context)
    longest = max(len(p) for p in prompts)
    if max_cache_len is not None:
        capacity = max_cache_len
    else:
        if longest >= context:
            raise InputError(f"a prompt of {longest} tokens exceeds the model's context "
                             f"(max_position_embeddings={context})")
        capacity = max(capacity_bucket(bucket_length(longest) + min(max_new_tokens, context), context), longest + 1)
    if longest + 1 > capacity:
        raise InputError(
            f"a prompt of {longest} tokens does not fit in a KV cache of {capacity} slots "
            f"(need at least {longest + 1}); raise max_cache_len or shorten the prompt"
        )
    stops = check_stop_ids(stop_token_ids, config.vocab_size)
    stops = config.eos_token_ids if stops is None else stops
    settings = program_settings(capacity, cache_dtype, attention)
    rows = len(prompts) if rows is None else check_int("rows", rows, minimum=len(prompts))
    params = row_params(rows, sampling, stops, min(max_new_tokens, settings.max_new_tokens))
    return prompts, settings, params, bucket_length(longest, capacity)


def check_memory(config, settings: DecodeSettings, batch: int, bucket: int, *, draft_config=None,
                 spec: TreeSpec | None = None, weights_bytes: int = 0, plan: ShardingPlan | None = None) -> int:
    """Refuses (InputError) a generation whose buffers can not fit in free memory; returns the bytes needed
    (per device on a mesh: ``plan``).

    ``weights_bytes``: weights not loaded yet (when checking before loading).
    """
    dp, kv_shards = (plan.data_parallel, plan.tensor_parallel if plan.shards_kv_heads else 1) if plan else (1, 1)
    return check_generation_memory(
        config, extra_bytes=weights_bytes, devices=len(plan.mesh.local_devices) if plan else 1,
        data_parallel=dp, kv_shards=kv_shards, batch=batch, bucket=bucket, capacity=settings.capacity,
        max_new_tokens=settings.max_new_tokens, cache_dtype=settings.cache_dtype, draft_config=draft_config,
        num_draft_tokens=spec.num_draft_tokens if spec else 0,
        headroom=cache_headroom(spec) if spec else 0, attention=settings.attention)


@contextlib.contextmanager
def device_errors():
    """Turns the accelerator running out of memory into an InputError with advice."""
    try:
        yield
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "Out of memory" not in str(e):
            raise
        first = str(e).strip().splitlines()[0][:300]
        raise InputError(f"out of device memory ({first}); lower max_cache_len (--max-cache-len), "
                         "max_new_tokens or the batch size") from None
