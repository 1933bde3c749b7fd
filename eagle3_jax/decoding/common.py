"""What plain and speculative decoding share: static settings, the result
buffers with their stop rules, and the prompt prefill. (The loop driver they
share is ``eagle3_jax/decoding/loop.py``.)"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax.attention import DEFAULT_BACKEND, AttentionMetadata, check_backend
from eagle3_jax.axes import ROWS, axes_field
from eagle3_jax.kv_cache import KVCache, aligned_capacity
from eagle3_jax.models.target import TargetModel, new_cache
from eagle3_jax.sampling import RowSampling, device_temperature
from eagle3_jax.sharding import put_like


class Finish(enum.IntEnum):
    """Why a row ended: the one finish-code type of the loop state (``DecodeResult.finish_reason``), the
    generator and the server. Any code but RUNNING ends a row in the loop.

    The compiled loop sets EOS, LENGTH and NONFINITE; the host sets the others between chunks of the
    loop, never inside it (:func:`with_finish_codes`): STOP (the row's decoded text holds a stop
    string), CANCELLED (the server's client went away: never reported) and ERROR (the server's request
    failed on the host, alone).
    """

    RUNNING = 0
    EOS = 1
    LENGTH = 2
    NONFINITE = 3
    STOP = 4
    CANCELLED = 5
    ERROR = 6

    @property
    def reason(self) -> str | None:
        """The name a caller sees ('eos', 'length', 'nonfinite', 'stop', 'cancelled', 'error'); None: running."""
        return None if self is Finish.RUNNING else self.name.lower()


# The codes as plain ints, for the compiled code.
RUNNING, FINISH_EOS, FINISH_LENGTH, FINISH_NONFINITE = (int(Finish.RUNNING), int(Finish.EOS), int(Finish.LENGTH),
                                                        int(Finish.NONFINITE))
FINISH_STOP_STRING = int(Finish.STOP)


def finish_reasons(codes) -> list[str | None]:
    """Finish codes -> 'eos' / 'length' / 'nonfinite' / 'stop' / 'cancelled' / 'error' (None: still running)."""
    return [Finish(int(c)).reason for c in np.asarray(codes)]


def nonfinite_rows(logits: jax.Array) -> jax.Array:
    """[batch] bool: rows of ``logits`` [batch, ...] with any NaN or infinity.

    A model with sound weights never produces them (nothing masks logits to
    -inf before selection), so one means broken weights or a numeric blow-up.
    A reduction over logits already computed: no extra forward.
    """
    return ~jnp.all(jnp.isfinite(logits), axis=tuple(range(1, logits.ndim)))


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Static knobs of a compiled decode: changing any of them recompiles.

    Attributes:
      max_new_tokens: generated tokens per row at most (the result buffer width).
      capacity: KV cache slots per row; prompt + generated tokens never exceed it.
      greedy: argmax decoding (else sampling with the traced temperature/top_p).
      top_k: top-k filter for sampling (0 = off).
      cache_dtype: KV cache storage dtype.
      attention: the attention backend's name (``eagle3_jax.attention.BACKENDS``).
    """

    max_new_tokens: int
    capacity: int
    greedy: bool = True
    top_k: int = 0
    cache_dtype: jnp.dtype = jnp.dtype(jnp.float32)
    attention: str = DEFAULT_BACKEND

    def __post_init__(self):
        check_backend(self.attention)


STOP_SLOTS = 8
# Stop ids per row in the per-row programs of the library and the server (a row with more widens them).
ROW_STOP_SLOTS = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RuntimeParams:
    """Per-call knobs that are traced, not compiled in: changing them reuses the program.

    One setting for the whole batch (scalars, :meth:`make`), or one per row
    (:meth:`per_row`: the server's continuous batching, where every row is
    another request). The two are different pytrees, so different programs.

    Attributes:
      temperature: [] or [batch] float32 sampling temperature (ignored when greedy).
      top_p: [] or [batch] float32 nucleus mass.
      stop_ids: [num_stops] or [batch, num_stops] int32 token ids that end a
        row; -1 fills unused entries.
      rows: None, or per-row greedy flags and top-k (:class:`RowSampling`, for
        a sampling program whose rows differ).
      max_new_tokens: None (the static ``DecodeSettings.max_new_tokens``), or
        [batch] int32 per-row limits (at most the static one).
    """

    temperature: jax.Array
    top_p: jax.Array
    stop_ids: jax.Array
    rows: RowSampling | None = None
    max_new_tokens: jax.Array | None = None

    @classmethod
    def make(cls, temperature: float = 1.0, top_p: float = 1.0, stop_ids=()) -> RuntimeParams:
        """Stop ids are padded with -1 to a multiple of 8 entries, so their count rarely changes a shape."""
        stop_ids = [int(t) for t in stop_ids]
        return cls(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p),
                   stop_ids=jnp.asarray(_pad_stops([stop_ids])[0], jnp.int32))

    @classmethod
    def per_row(cls, temperature: Sequence[float], top_p: Sequence[float], top_k: Sequence[int],
                stop_ids: Sequence[Sequence[int]], max_new_tokens: Sequence[int], *,
                stop_slots: int = STOP_SLOTS) -> RuntimeParams:
        """One setting per row; a temperature of 0 (or below float32's smallest normal: ``device_temperature``)
        is a greedy row (its temperature is never used: 1).
        Stop ids are padded with -1 to ``stop_slots`` entries (more if a row has more; -1 entries given
        are kept as padding)."""
        temperature = np.asarray([device_temperature(float(t)) for t in temperature], np.float32)
        greedy = temperature == 0
        return cls(temperature=jnp.asarray(np.where(greedy, 1.0, temperature), np.float32),
                   top_p=jnp.asarray(top_p, np.float32),
                   stop_ids=jnp.asarray(_pad_stops(stop_ids, stop_slots), np.int32),
                   rows=RowSampling(greedy=jnp.asarray(greedy), top_k=jnp.asarray(top_k, np.int32)),
                   max_new_tokens=jnp.asarray(max_new_tokens, np.int32))

    def row_stops(self, batch: int) -> jax.Array:
        """[batch, num_stops] stop ids (a shared list broadcast to every row)."""
        return self.stop_ids if self.stop_ids.ndim == 2 else jnp.broadcast_to(self.stop_ids, (batch,) +
                                                                               self.stop_ids.shape)


def _pad_stops(rows: Sequence[Sequence[int]], slots: int = STOP_SLOTS) -> list[list[int]]:
    """Rows of stop ids padded with -1 to one width: a multiple of ``slots``, at least ``slots``."""
    longest = max((len(r) for r in rows), default=0)
    width = max(slots, -(-longest // STOP_SLOTS) * STOP_SLOTS)
    return [[int(t) for t in r] + [-1] * (width - len(r)) for r in rows]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeResult:
    """Generated tokens and per-row counters, fixed-size.

    Attributes:
      tokens: [batch, max_new_tokens] int32, generated tokens; -1 past the end.
      num_generated: [batch] int32.
      finish_reason: [batch] int32, RUNNING / FINISH_EOS / FINISH_LENGTH /
        FINISH_NONFINITE (the model's logits were not finite; see ``append``).
      num_forwards: [batch] int32, target forwards after prefill (a forward
        whose logits were not finite is not counted).
      prompt_lengths: [batch] int32.
      accept_lengths: [batch, max_new_tokens] int32, tokens appended by each
        counted forward, in order (1 each in plain decoding, 1..D+1 per
        speculative cycle, bonus included); 0 past ``num_forwards``.
    """

    tokens: jax.Array = axes_field(ROWS)
    num_generated: jax.Array = axes_field(ROWS)
    finish_reason: jax.Array = axes_field(ROWS)
    num_forwards: jax.Array = axes_field(ROWS)
    prompt_lengths: jax.Array = axes_field(ROWS)
    accept_lengths: jax.Array = axes_field(ROWS)

    @classmethod
    def start(cls, first_token: jax.Array, settings: DecodeSettings, prompt_lengths: jax.Array,
              params: RuntimeParams, nonfinite: jax.Array | None = None) -> DecodeResult:
        """The result after prefill: one generated token per row (none, and
        'nonfinite', for a row flagged in ``nonfinite`` [batch] bool)."""
        batch = first_token.shape[0]
        zeros = jnp.zeros((batch,), jnp.int32)
        empty = cls(tokens=jnp.full((batch, settings.max_new_tokens), -1, jnp.int32), num_generated=zeros,
                    finish_reason=zeros, num_forwards=zeros, prompt_lengths=prompt_lengths.astype(jnp.int32),
                    accept_lengths=jnp.zeros((batch, settings.max_new_tokens), jnp.int32))
        return empty.append(first_token[:, None], jnp.ones((batch,), jnp.int32), settings, params,
                            nonfinite=nonfinite)

    def append(self, new_tokens: jax.Array, counts: jax.Array, settings: DecodeSettings, params: RuntimeParams,
               forwards: jax.Array | None = None, nonfinite: jax.Array | None = None) -> DecodeResult:
        """Appends up to ``counts[b]`` of ``new_tokens[b]`` to each running row.

        A row keeps tokens up to and including its first stop token, and no
        more than ``max_new_tokens`` (the static one, or the row's own in
        ``params.max_new_tokens``) in all or than the cache can hold
        (prompt + generated <= capacity); it then finishes with 'eos' or
        'length'. A running row flagged in ``nonfinite`` appends nothing
        (its candidate tokens were chosen from non-finite logits), does not
        count the forward, and finishes with 'nonfinite'; the tokens it
        appended before stay. Finished rows are unchanged.

        Args:
          new_tokens: [batch, k] int32 candidate tokens, in order.
          counts: [batch] int32, how many of them are real (0..k).
          params: its stop ids (shared or per row; -1 entries never match) and per-row limits.
          forwards: [batch] int32 target forwards to add to the counters.
          nonfinite: [batch] bool, rows whose logits this step were not finite.
        """
        batch, k = new_tokens.shape
        running = self.finish_reason == RUNNING
        bad = jnp.zeros((batch,), bool) if nonfinite is None else running & nonfinite
        idx = jnp.arange(k, dtype=jnp.int32)[None, :]
        counts = jnp.where(running & ~bad, counts, 0)
        valid = idx < counts[:, None]
        stops = params.row_stops(batch)[:, None, :]  # [batch, 1, num_stops]
        is_stop = valid & jnp.any((new_tokens[:, :, None] == stops) & (stops >= 0), axis=-1)
        has_stop = jnp.any(is_stop, axis=1)
        through_stop = jnp.where(has_stop, jnp.argmax(is_stop, axis=1) + 1, counts)
        limit = settings.max_new_tokens
        if params.max_new_tokens is not None:
            limit = jnp.minimum(params.max_new_tokens, limit)
        room = jnp.minimum(limit - self.num_generated, settings.capacity - self.prompt_lengths - self.num_generated)
        take = jnp.minimum(through_stop, room)
        dest = jnp.where(idx < take[:, None], self.num_generated[:, None] + idx, settings.max_new_tokens)
        tokens = self.tokens.at[jnp.arange(batch)[:, None], dest].set(new_tokens, mode="drop")
        num_generated = self.num_generated + take
        full = (num_generated >= limit) | (self.prompt_lengths + num_generated >= settings.capacity)
        reason = jnp.where(has_stop & (through_stop <= room), FINISH_EOS, jnp.where(full, FINISH_LENGTH, RUNNING))
        reason = jnp.where(bad, FINISH_NONFINITE, reason)
        reason = jnp.where(running, reason, self.finish_reason)
        num_forwards, accept_lengths = self.num_forwards, self.accept_lengths
        if forwards is not None:
            counted = running & ~bad & (forwards > 0)
            num_forwards = self.num_forwards + jnp.where(counted, forwards, 0)
            at = jnp.where(counted, self.num_forwards, settings.max_new_tokens)
            accept_lengths = self.accept_lengths.at[jnp.arange(batch), at].set(take, mode="drop")
        return dataclasses.replace(self, tokens=tokens, num_generated=num_generated, finish_reason=reason,
                                   num_forwards=num_forwards, accept_lengths=accept_lengths)


def with_finish_codes(state, codes) -> object:
    """A loop state (anything with a ``result``) whose rows' finish codes are ``codes`` ([batch], on the
    host), placed as the loop's own buffer (on a mesh: sharded), so the next chunk runs the same program.
    How the host ends rows between chunks: stop strings, padding rows, the server's retired rows."""
    finish = put_like(np.asarray(codes), state.result.finish_reason)
    return dataclasses.replace(state, result=dataclasses.replace(state.result, finish_reason=finish))


def with_all_finished(state) -> object:
    """A loop state with every row finished ('length'): an empty batch (a free row is a finished one)."""
    return with_finish_codes(state, np.full(state.result.finish_reason.shape, FINISH_LENGTH, np.int32))


PREFILL_CHUNK = 512


def prefill(model: TargetModel, tokens: jax.Array, prompt_lengths: jax.Array, settings: DecodeSettings,
            feature_layers: tuple[int, ...] = (), chunk: int = PREFILL_CHUNK
            ) -> tuple[jax.Array, KVCache, jax.Array | None]:
    """Runs right-padded prompts through the target into a fresh cache.

    Prompts longer than ``chunk`` go through in chunks (a ``lax.scan``), each
    attending to the cache written so far, so the attention scores of a
    prefill are [chunk, capacity] per head rather than [bucket, capacity].

    Args:
      tokens: [batch, bucket] int32 prompts, right-padded (padding is never attended).
      prompt_lengths: [batch] int32 true lengths, 1 <= length <= bucket.
    Returns:
      logits [batch, vocab] float32 at each row's last prompt token, the cache
      (lengths = prompt_lengths), and the requested features [batch, bucket, n*hidden].
    """
    cfg = model.config
    batch, bucket = tokens.shape
    cache = new_cache(cfg, batch, aligned_capacity(settings.capacity), settings.cache_dtype)
    last = prompt_lengths - 1
    chunk = min(chunk, bucket)  # a prompt that fits is one chunk
    num_chunks = -(-bucket // chunk)
    padded = jnp.pad(tokens, ((0, 0), (0, num_chunks * chunk - bucket)))
    chunks = padded.reshape(batch, num_chunks, chunk).transpose(1, 0, 2)  # [chunks, batch, chunk]

    def body(carry, xs):
        cache, logits = carry
        toks, index = xs
        start = index * chunk
        meta = AttentionMetadata.causal(jnp.full((batch,), start, jnp.int32), chunk, backend=settings.attention)
        out = model(toks, cache, meta, feature_layers=feature_layers,
                    logits_indices=jnp.clip(last - start, 0, chunk - 1)[:, None])
        here = (last >= start) & (last < start + chunk)
        logits = jnp.where(here[:, None], out.logits[:, 0], logits)
        return (out.cache, logits), out.features

    init = (cache, jnp.zeros((batch, cfg.vocab_size), jnp.float32))
    (cache, logits), features = jax.lax.scan(body, init, (chunks, jnp.arange(num_chunks, dtype=jnp.int32)))
    if features is not None:
        features = features.transpose(1, 0, 2, 3).reshape(batch, num_chunks * chunk, -1)[:, :bucket]
    return logits, cache.with_lengths(prompt_lengths), features
