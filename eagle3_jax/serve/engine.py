"""Continuous batching over the one-jit loop (docs/architecture.md#serving).

The :class:`BatchEngine` owns one decoding loop state of a fixed number of
rows (``max_batch``) and a fixed KV capacity per row (``max_cache_len``): the
shapes of the compiled programs never change while it serves. One thread
drives it, repeating:

1. **admit**: for each free row and waiting request, prefill the request
   alone (a one-row prefill, the same program :class:`~eagle3_jax.generation.Generator`
   runs for one prompt) and write its state into the row
   (:meth:`Runner.insert_row <eagle3_jax.runner.Runner.insert_row>`: a
   ``dynamic_update_slice`` on every leaf's row axis; the other rows' caches
   and counters are untouched);
2. **run a chunk**: the compiled loop (plain or speculative), at most
   ``chunk`` iterations, every running row advancing;
3. **between chunks**: each row's new tokens go to its request's sink, which
   may end the row (a stop string); rows whose client went away are ended;
   finished rows are retired and their rows are free again.

Every row has its own sampling settings (temperature, top-p, top-k, greedy,
seed, stop tokens, token limit: :meth:`RuntimeParams.per_row`) and its own
PRNG key, so a request's tokens do not depend on the other requests in the
batch: greedy rows give the tokens of ``Generator.generate`` of that prompt
alone, and a sampled request with a seed gives the tokens it gives alone.

The engine runs through the generator's :class:`~eagle3_jax.runner.Runner`,
so on a device mesh too (the target tensor-parallel, the rows over the data
axis): the same tokens as on one device.

The queue of waiting requests is bounded (``max_queue``): :meth:`submit`
raises :class:`QueueFull` past it, which the server answers with 503.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import jax
import numpy as np

from eagle3_jax.decoding.common import ROW_STOP_SLOTS, Finish, RuntimeParams, with_all_finished, with_finish_codes
from eagle3_jax.errors import InputError
from eagle3_jax.generation import Generator
from eagle3_jax.planning import bucket_length, check_memory, device_errors, program_settings
from eagle3_jax.sampling import MAX_TOP_K
from eagle3_jax.sharding import put_like, to_host
from eagle3_jax.validation import check_int, check_real, check_seed, check_token_ids

logger = logging.getLogger("eagle3_jax.serve")

# Stop token ids a row can hold (the model's eos ids and a request's own): a static width.
STOP_WIDTH = ROW_STOP_SLOTS  # stop ids per row: the library's programs' width, so both share them


class QueueFull(Exception):
    """The queue of waiting requests is full; try again later."""


class EngineClosed(Exception):
    """The engine has been shut down (the server is stopping)."""


class Sink(Protocol):
    """Where a request's tokens go; called from the engine's thread."""

    def tokens(self, ids: list[int]) -> bool:
        """New tokens of the request, in order; returns True to end the request now (a stop string)."""

    def finish(self, reason: str, stats: RequestStats) -> None:
        """The request has ended: 'eos', 'length', 'stop' (ended by :meth:`tokens`), 'nonfinite', 'error'
        (it failed alone) or 'shutdown' (the server is stopping)."""


@dataclasses.dataclass
class RequestStats:
    """A finished request's counters.

    Attributes:
      prompt_tokens, completion_tokens: token counts (the completion as generated).
      accept_lengths: tokens committed per target forward after the prefill.
      queued_seconds: time from submit to admission; ttft_seconds: submit to first token.
    """

    prompt_tokens: int
    completion_tokens: int
    accept_lengths: list[int]
    queued_seconds: float
    ttft_seconds: float


@dataclasses.dataclass(eq=False)
class EngineRequest:
    """One generation request, as the engine runs it.

    Attributes:
      prompt: token ids (1 <= len < capacity).
      max_tokens: generated tokens at most.
      temperature: 0 for greedy; top_p in (0, 1]; top_k: 0 = off.
      seed: PRNG seed of this request's draws.
      stop_ids: token ids that end it (the model's eos ids and any of its own).
      sink: where its tokens and its end go.
    """

    prompt: list[int]
    max_tokens: int
    sink: Sink
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    cancelled: bool = False
    sent: int = 0  # tokens given to the sink so far
    error: str | None = None  # why it failed (finish reason 'error'), for the client

    def cancel(self) -> None:
        """Ends the request at the next chunk boundary (its client went away); its row is freed."""
        self.cancelled = True


# ------------------------------------------------------------------ the engine

class BatchEngine:
    """Continuous batching of generation requests over fixed batch rows (see the module docstring).

    Args:
      generator: the :class:`Generator` whose runner (weights, tree shape,
        device mesh), cache dtype and attention backend it runs.
      max_batch: rows decoded together (a compiled shape; on a mesh, a
        multiple of its data axis).
      max_cache_len: KV slots per row: a request's prompt plus its tokens
        (a compiled shape); default the model's context, at most 4096.
      chunk: loop iterations (speculative cycles or plain steps) between two
        admissions; smaller admits sooner, larger spends less time on the host.
      max_queue: waiting requests at most (beyond, :meth:`submit` raises QueueFull).
      admission: 'continuous' (a free row takes a waiting request at once) or
        'static' (waiting requests are admitted only when every row is free:
        the classic static batching, for comparison).
    """

    def __init__(self, generator: Generator, *, max_batch: int = 8, max_cache_len: int | None = None,
                 chunk: int = 4, max_queue: int = 256, admission: str = "continuous"):
        if admission not in ("continuous", "static"):
            raise InputError(f"admission must be 'continuous' or 'static', got {admission!r}")
        self.runner = generator.runner
        self.config = generator.config
        dp = self.runner.data_parallel
        if max_batch % dp:
            raise InputError(f"max_batch ({max_batch}, --max-batch) must be a multiple of the mesh's data axis "
                             f"({dp}, --data-parallel): each data shard holds max_batch / {dp} rows")
        context = self.config.max_position_embeddings
        self.capacity = min(context, 4096) if max_cache_len is None else max_cache_len
        if not 2 <= self.capacity <= context:
            raise InputError(f"max_cache_len must be between 2 and the model's context ({context}), "
                             f"got {self.capacity}")
        self.max_batch, self.chunk, self.max_queue, self.admission = max_batch, chunk, max_queue, admission
        self.eos_ids = tuple(self.config.eos_token_ids)
        if len(self.eos_ids) > STOP_WIDTH // 2:
            raise InputError(f"the model has {len(self.eos_ids)} eos ids; at most {STOP_WIDTH // 2} are supported")
        self.settings = program_settings(self.capacity, generator.cache_dtype, generator.attention)
        # Prompts are prefilled one row at a time: the batch's buffers are what counts.
        check_memory(self.config, self.settings, max_batch, 16, spec=self.runner.spec,
                     draft_config=self.runner.draft_config, plan=self.runner.plan)

        self._lock = threading.Condition()
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._rows: list[EngineRequest | None] = [None] * max_batch
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False  # shut down: no more requests
        self.error: BaseException | None = None
        # Host copies of the per-row settings, sent with each chunk.
        self._temperature = np.zeros(max_batch, np.float32)
        self._top_p = np.ones(max_batch, np.float32)
        self._top_k = np.zeros(max_batch, np.int32)
        self._stops = np.full((max_batch, STOP_WIDTH), -1, np.int32)
        self._limit = np.ones(max_batch, np.int32)
        self._state = None
        self.compile_seconds = 0.0
        # Counters for /metrics (read without the lock: plain ints and floats).
        self.generated_tokens = 0
        self.finished_requests = 0
        self.verify_forwards = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)  # (time, tokens)

    # -------------------------------------------------------------- public

    @property
    def speculative(self) -> bool:
        return self.runner.speculative

    def max_stop_ids(self) -> int:
        """Stop token ids a request may add to the model's eos ids."""
        return STOP_WIDTH - len(self.eos_ids)

    def check(self, request: EngineRequest) -> None:
        """Raises InputError if ``request`` can not run here (a prompt too long, too many stop ids, a setting
        out of range): nothing that reaches the engine's thread can fail there."""
        n = len(request.prompt)
        if n == 0:
            raise InputError("the prompt is empty")
        if n + 1 > self.capacity:
            raise InputError(f"the prompt has {n} tokens; this server's KV cache holds {self.capacity} per request "
                             f"(--max-cache-len), so a prompt may have at most {self.capacity - 1}")
        if len(request.stop_ids) > STOP_WIDTH:
            raise InputError(f"{len(request.stop_ids)} stop token ids with the model's eos ids; a request may add "
                             f"at most {self.max_stop_ids()} to the model's {len(self.eos_ids)}")
        check_int("max_tokens", request.max_tokens, minimum=1)
        check_real("temperature", request.temperature, minimum=0.0)
        check_real("top_p", request.top_p, minimum=0.0, maximum=1.0, open_minimum=True)
        check_int("top_k", request.top_k, minimum=0, maximum=MAX_TOP_K)
        check_seed(request.seed)
        check_token_ids("the prompt", request.prompt, self.config.vocab_size)
        check_token_ids("the stop token ids", request.stop_ids, self.config.vocab_size, allow_empty=True)

    def submit(self, request: EngineRequest) -> None:
        """Queues a request (checked with :meth:`check`); raises QueueFull when the queue is full."""
        self.check(request)
        with self._lock:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if self.error is not None:
                raise RuntimeError(f"the engine stopped: {self.error}")
            if len(self._waiting) >= self.max_queue:  # requests whose clients left make room first
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(request)
            self._lock.notify_all()

    def start(self) -> None:
        """Builds the empty batch and starts the engine's thread."""
        with device_errors():
            self._state = self._empty()
        self._thread = threading.Thread(target=self._run, name="eagle3-jax-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the thread after its current chunk (requests still running are not finished)."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def shutdown(self, timeout: float = 10.0) -> int:
        """Stops the thread (after its current chunk, or prefill; waiting at most ``timeout`` seconds) and ends
        every request still waiting or running with 'shutdown' (their clients get an error saying so); later
        submits are refused, and a thread still busy past the timeout admits and delivers nothing more.
        Returns how many requests it ended (those whose clients had already left are not counted)."""
        with self._lock:
            self._closed = True  # the thread admits and delivers nothing more from here on
        self.stop(timeout)
        with self._lock:
            pending = [r for r in self._rows if r is not None] + list(self._waiting)
            self._waiting.clear()
            self._rows = [None] * self.max_batch
        ended = 0
        for request in pending:
            if not request.cancelled:
                _safe_finish(request, "shutdown", self._stats(request, []))
                ended += 1
        return ended

    def warmup(self, buckets: Sequence[int] = (16,)) -> float:
        """Compiles the prefill of the given prompt buckets, the insertion and the loop (before
        serving, so that the first requests do not wait for them); returns the seconds it took."""
        t0 = time.perf_counter()
        for bucket in buckets:
            bucket = min(bucket, bucket_length(self.capacity - 1, self.capacity))
            row = self._prefill([0] * min(bucket, self.capacity - 1), self._row_params([0.0], [1.0], [0], [[]], [1]),
                                seed=0)
            state, _ = self.runner.insert_row(self._state, row, 0)
            self._state = with_all_finished(state)
        self._state, _ = self.runner.run(self.settings, self._state, self._params(), self.chunk)
        jax.block_until_ready(self._state)
        return time.perf_counter() - t0

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Tokens generated per second over the last ``window`` seconds."""
        now = time.perf_counter()
        recent = list(self._recent)
        return sum(n for t, n in recent if t >= now - window) / window

    def queue_depth(self) -> int:
        """Requests waiting for a row (not counting those whose clients left)."""
        return sum(not r.cancelled for r in list(self._waiting))

    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    # -------------------------------------------------------------- the thread

    def _empty(self):
        return self.runner.empty_state(self.settings, self.max_batch, 16, self._params())

    def _params(self) -> RuntimeParams:
        """The batch's per-row settings (free rows are greedy: temperature 0)."""
        return self._row_params(self._temperature, self._top_p, self._top_k, self._stops, self._limit)

    def _row_params(self, temperature, top_p, top_k, stops, limit) -> RuntimeParams:
        return RuntimeParams.per_row(temperature, top_p, top_k, stops, limit, stop_slots=STOP_WIDTH)

    def _prefill(self, prompt: list[int], params: RuntimeParams, seed: int):
        bucket = bucket_length(len(prompt), self.capacity)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, : len(prompt)] = prompt
        state, seconds = self.runner.prefill(self.settings, tokens, np.asarray([len(prompt)], np.int32),
                                             jax.random.key(seed), params)
        self.compile_seconds += seconds
        return state

    def _run(self) -> None:
        try:
            with device_errors():
                while self._serve_once():
                    pass
        except BaseException as e:  # the engine is dead: fail every request instead of hanging them
            logger.exception("the engine stopped")
            with self._lock:
                self.error = e
                pending = [r for r in self._rows if r is not None] + list(self._waiting)
                self._waiting.clear()
                self._rows = [None] * self.max_batch
            for request in pending:
                _safe_finish(request, "error", self._stats(request, []))

    def _serve_once(self) -> bool:
        """Admits, runs one chunk and retires; returns False when stopping."""
        admitted = self._admit()
        with self._lock:
            if self._stopping:
                return False
            if not any(r is not None for r in self._rows):
                if not self._waiting:  # (a request submitted since _admit looked is admitted at once)
                    self._lock.wait(timeout=0.5)
                return True
        if admitted:
            self._deliver()  # the first tokens (time to first token) before the chunk runs
        # The iteration counter restarts every chunk: a server's lifetime of iterations would overflow int32.
        self._state = dataclasses.replace(self._state, iterations=put_like(np.int32(0), self._state.iterations))
        self._state, seconds = self.runner.run(self.settings, self._state, self._params(), self.chunk)
        self.compile_seconds += seconds
        self._deliver()
        return True

    def _admit(self) -> bool:
        """Prefills waiting requests into free rows; returns whether any was admitted."""
        admitted = False
        while True:
            with self._lock:
                if self._stopping or self._closed:  # shutting down: nothing new starts
                    return admitted
                busy = any(r is not None for r in self._rows)
                if self.admission == "static" and busy and not admitted:
                    return False
                free = [i for i, r in enumerate(self._rows) if r is None]
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft()
                if not free or not self._waiting:
                    return admitted
                request = self._waiting.popleft()
                row = free[0]
                self._rows[row] = request
            request.admitted = time.perf_counter()
            stops = list(request.stop_ids)
            limit = min(request.max_tokens, self.capacity - len(request.prompt))
            params = self._row_params([request.temperature], [request.top_p], [request.top_k], [stops], [limit])
            try:
                with device_errors():
                    row_state = self._prefill(request.prompt, params, request.seed)
            except Exception as e:  # (e.g. out of memory for a long prompt's bucket): this request fails alone
                logger.exception("the prefill of a request failed")
                request.error = f"its prefill failed: {str(e).strip().splitlines()[0][:300]}"
                with self._lock:
                    self._rows[row] = None
                _safe_finish(request, "error", self._stats(request, []))
                continue
            with self._lock:
                if self._closed:  # shut down while it was prefilled: shutdown() has answered it
                    return admitted
            self._state, seconds = self.runner.insert_row(self._state, row_state, row)
            self.compile_seconds += seconds
            self._temperature[row], self._top_p[row], self._top_k[row] = request.temperature, request.top_p, \
                request.top_k
            self._stops[row] = -1
            self._stops[row, : len(stops)] = stops
            self._limit[row] = limit
            admitted = True

    def _deliver(self) -> None:
        """Hands each row's new tokens to its sink, ends rows that asked to stop or were cancelled,
        and retires the finished ones."""
        if self._closed:  # shutdown() has answered every request
            return
        result = self._state.result
        tokens, counts, codes, forwards = to_host((result.tokens, result.num_generated, result.finish_reason,
                                                   result.num_forwards))
        codes = np.array(codes)
        ended = False
        accept = None  # every row's accept lengths, fetched once when a row finishes
        now = time.perf_counter()
        delivered = 0
        for row, request in enumerate(self._rows):
            if request is None:
                continue
            n = int(counts[row])
            if request.cancelled:
                ended |= codes[row] == Finish.RUNNING
                codes[row] = Finish.CANCELLED
            elif n > request.sent:
                if request.first_token is None:
                    request.first_token = now
                new = [int(t) for t in tokens[row, request.sent:n]]
                request.sent = n
                delivered += len(new)
                stop = _safe_tokens(request, new)
                if request.error is not None:  # its sink failed: the request ends with an error
                    ended |= codes[row] == Finish.RUNNING
                    codes[row] = Finish.ERROR
                elif stop and codes[row] != Finish.NONFINITE:  # a stop string (also in a row that just ended)
                    ended |= codes[row] == Finish.RUNNING
                    codes[row] = Finish.STOP
            if codes[row] == Finish.RUNNING:
                continue
            with self._lock:
                self._rows[row] = None
            if codes[row] == Finish.CANCELLED:  # nobody is listening
                continue
            if accept is None:
                accept = np.asarray(to_host(result.accept_lengths))
            steps = accept[row, : int(forwards[row])].tolist()
            self.verify_forwards += len(steps)
            reason = Finish(int(codes[row])).reason
            _safe_finish(request, reason, self._stats(request, steps))
            self.finished_requests += 1
        if delivered:
            self.generated_tokens += delivered
            self._recent.append((now, delivered))
        if ended:
            self._state = with_finish_codes(self._state, codes)

    def _stats(self, request: EngineRequest, accept: list[int]) -> RequestStats:
        first = request.first_token or time.perf_counter()
        return RequestStats(prompt_tokens=len(request.prompt), completion_tokens=request.sent, accept_lengths=accept,
                            queued_seconds=(request.admitted or first) - request.submitted,
                            ttft_seconds=first - request.submitted)


def _safe_tokens(request: EngineRequest, ids: list[int]) -> bool:
    try:
        return bool(request.sink.tokens(ids))
    except Exception as e:  # a broken sink (e.g. a tokenizer that can not decode) ends its own request only
        logger.exception("a request's sink failed; ending the request")
        request.error = f"its tokens could not be turned into text ({type(e).__name__}: {str(e)[:200]})"
        return True


def _safe_finish(request: EngineRequest, reason: str, stats: RequestStats) -> None:
    try:
        request.sink.finish(reason, stats)
    except Exception:
        logger.exception("a request's sink failed at its end")


__all__ = ["BatchEngine", "EngineClosed", "EngineRequest", "QueueFull", "RequestStats", "Sink", "STOP_WIDTH"]
