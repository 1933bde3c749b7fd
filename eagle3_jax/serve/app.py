"""The HTTP server: OpenAI's completions and chat completions over the batch engine (Starlette/FastAPI).

Routes:
  GET  /v1/models             the served model
  POST /v1/completions        text (or token-id) prompts
  POST /v1/chat/completions   chats, rendered by the tokenizer's chat template
  GET  /health                200 while the engine runs, 503 once it has failed
  GET  /metrics               Prometheus text (serve/metrics.py)

Both generation routes answer whole (JSON) or streamed as server-sent
events (``stream: true``: ``data: {chunk}`` lines, then ``data: [DONE]``).
A request's body is read within the server's limits and prepared (parsed,
templated, tokenized) on a worker thread, never on the event loop
(:class:`Server`); it then becomes an
:class:`~eagle3_jax.serve.engine.EngineRequest` whose sink, called on the
engine's thread, turns tokens into text (serve/text_stream.py) and hands the
deltas to the request's asyncio queue. A client that goes away, streamed or
not, cancels its request at once, which frees its batch row at the next
chunk boundary. When the server stops, every request in flight ends with a
503 body (``code: server_shutting_down``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from eagle3_jax.errors import InputError
from eagle3_jax.serve.engine import STOP_WIDTH, BatchEngine, EngineClosed, EngineRequest, QueueFull, RequestStats
from eagle3_jax.serve.limits import BodyBudget, decode_json, default_prompt_chars, read_body
from eagle3_jax.serve.metrics import Metrics
from eagle3_jax.serve.offload import Offloader, PrepareTimeout, WorkersBusy
from eagle3_jax.serve.protocol import (
    FINISH,
    APIError,
    Defaults,
    Limits,
    Parsed,
    chunk,
    new_id,
    parse_request,
    response,
    usage,
)
from eagle3_jax.serve.text_stream import Delta, ReasoningSplitter, TextStream
from eagle3_jax.text import (
    THINK_END,
    decode,
    has_chat_template,
    prompt_opens_thinking,
    reasoning_and_answer,
    render_chat,
    token_ids,
)

logger = logging.getLogger("eagle3_jax.serve")


@dataclasses.dataclass(frozen=True)
class DeltaEvent:
    """New text (``delta``: content and reasoning) and the new token ids of a request's reply."""

    delta: Delta
    token_ids: list[int]


@dataclasses.dataclass(frozen=True)
class EndEvent:
    """A request's end: its finish reason ('eos', 'length', 'stop', 'nonfinite', 'error', 'shutdown') and counters."""

    reason: str
    stats: RequestStats


@dataclasses.dataclass(frozen=True)
class GoneEvent:
    """The client went away: whoever waits for the request's end stops waiting."""


QueueEvent = DeltaEvent | EndEvent | GoneEvent


class _Sink:
    """A request's sink: text and token deltas and its end, handed from the engine's thread to its asyncio queue.

    Queue items (:data:`QueueEvent`): :class:`DeltaEvent` and, last, :class:`EndEvent`, or :class:`GoneEvent`
    when the client disconnected. With a stop string, the token ids stop at those covering the text.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, text: TextStream | None):
        self.loop, self.text = loop, text
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []  # every token generated
        self.sent_ids = 0  # tokens handed on

    def _put(self, item: QueueEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def gone(self) -> None:
        """The client went away (on the event loop): whoever waits for this request's end stops waiting."""
        self.queue.put_nowait(GoneEvent())

    def kept(self) -> list[int]:
        """The reply's tokens: all of them, or those covering the text when a stop string ended it."""
        if self.text is not None and self.text.stopped:
            return self.ids[: self.text.kept_tokens]
        return self.ids

    def tokens(self, ids: list[int]) -> bool:
        self.ids.extend(ids)
        delta, stop = self.text.add(ids) if self.text is not None else (Delta(), False)
        self._hand_on(delta)
        return stop

    def _hand_on(self, delta: Delta) -> None:
        kept = self.kept()
        new = kept[self.sent_ids:]
        self.sent_ids = max(self.sent_ids, len(kept))
        if delta or new:
            self._put(DeltaEvent(delta, new))

    def finish(self, reason: str, stats: RequestStats) -> None:
        try:
            if self.text is not None and reason not in ("error", "nonfinite"):
                self._hand_on(self.text.finish())
        finally:  # the request's end is always handed on, or its client would wait for ever
            self._put(EndEvent(reason, stats))


class Server:
    """What the routes share: the engine, the tokenizer, the model's name, its defaults and the limits.

    A request goes through three stages, each bounded: its body is read on the event loop within the
    size, time and memory limits (:func:`~eagle3_jax.serve.limits.read_body`); it is parsed, checked,
    rendered by the chat template and tokenized on a worker thread within ``limits.prepare_timeout``
    (:meth:`prepare`, run by an :class:`~eagle3_jax.serve.offload.Offloader`); then it is queued on the
    engine. Nothing a client sends runs on the event loop, so ``/health`` and the streams of other
    clients are served meanwhile.

    Args:
      engine: a started :class:`BatchEngine`.
      model_name: the name clients send as ``model``.
      tokenizer: the target's tokenizer (None: token-id prompts only, no text in responses).
      reasoning: split thinking models' chat replies into ``reasoning_content`` and ``content``.
      defaults: sampling defaults for requests that leave them out.
      retry_after: seconds a client refused with 503 is told to wait.
      aliases: other names accepted as ``model`` (e.g. the Hub id the name was taken from).
      limits: what a client may send (:class:`~eagle3_jax.serve.protocol.Limits`); its
        ``max_prompt_chars`` defaults to :func:`~eagle3_jax.serve.limits.default_prompt_chars`.
    """

    def __init__(self, engine: BatchEngine, *, model_name: str, tokenizer: Any = None, reasoning: bool = False,
                 defaults: Defaults | None = None, retry_after: int = 1, aliases: tuple[str, ...] = (),
                 limits: Limits | None = None):
        self.engine, self.model_name, self.tokenizer = engine, model_name, tokenizer
        self.model_names = tuple(dict.fromkeys((model_name,) + tuple(aliases)))
        self.reasoning, self.defaults, self.retry_after = reasoning, defaults or Defaults(), retry_after
        limits = limits or Limits()
        if limits.max_prompt_chars is None:
            limits = dataclasses.replace(limits, max_prompt_chars=default_prompt_chars(engine.capacity, tokenizer))
        self.limits = limits
        self.offload = Offloader(limits.prepare_workers, limits.prepare_timeout)
        self.budget = BodyBudget(limits.buffered_bytes)
        max_accept = engine.runner.spec.num_steps + 1 if engine.speculative else 1
        self.metrics = Metrics(engine, max_accept)
        self.created = int(time.time())
        self.closing: asyncio.Event | None = None  # set when the server begins to shut down (made on the loop)

    # -------------------------------------------------------------- requests

    def prepare(self, raw: bytes, chat: bool) -> tuple[Parsed, list[int]]:
        """A request body -> (the checked request, its prompt's token ids). Runs on a worker thread (it
        parses what the client sent, renders the chat template and tokenizes); raises APIError."""
        body = decode_json(raw, self.limits)
        parsed = parse_request(body, chat=chat, model_names=self.model_names, defaults=self.defaults,
                               limits=self.limits, vocab_size=self.engine.config.vocab_size)
        return parsed, self.prompt_ids(parsed)

    def prompt_ids(self, parsed: Parsed) -> list[int]:
        """The prompt's token ids (a chat rendered by the chat template)."""
        try:
            if parsed.chat:
                if self.tokenizer is None or not has_chat_template(self.tokenizer):
                    raise APIError("this model has no chat template; use /v1/completions, or start the server "
                                   "with --chat-template FILE", param="messages")
                text = render_chat(self.tokenizer, parsed.prompt, where="messages", **parsed.chat_template_kwargs)
                return token_ids(self.tokenizer, text, where="messages")
            if isinstance(parsed.prompt, str):
                if self.tokenizer is None:
                    raise APIError("this model has no tokenizer: give the prompt as a list of token ids",
                                   param="prompt")
                return token_ids(self.tokenizer, parsed.prompt, where="prompt")
            return list(parsed.prompt)
        except InputError as e:
            raise APIError(str(e), param="messages" if parsed.chat else "prompt") from None

    def engine_request(self, parsed: Parsed, prompt: list[int], sink: _Sink) -> EngineRequest:
        engine = self.engine
        room = engine.capacity - len(prompt)
        if room < 1:
            raise APIError(f"the prompt has {len(prompt)} tokens; this server's KV cache holds {engine.capacity} "
                           f"tokens per request (--max-cache-len), prompt and completion together, so a prompt "
                           f"may have at most {engine.capacity - 1}", param="messages" if parsed.chat else "prompt",
                           code="context_length_exceeded")
        max_tokens = room if parsed.max_tokens is None else parsed.max_tokens
        if max_tokens > room:
            name = parsed.max_tokens_name
            raise APIError(f"{name} is {max_tokens}, but the prompt has {len(prompt)} tokens and this server's "
                           f"KV cache holds {engine.capacity} per request: at most {room} tokens can follow it",
                           param=name, code="context_length_exceeded")
        eos = () if parsed.ignore_eos else engine.eos_ids
        stop_ids = tuple(dict.fromkeys(eos + parsed.stop_token_ids))
        if len(stop_ids) > STOP_WIDTH:
            raise APIError(f"{len(parsed.stop_token_ids)} stop token ids (stop_token_ids and integer entries of "
                           f"stop together); a request may give at most {engine.max_stop_ids()}",
                           param="stop_token_ids")
        request = EngineRequest(prompt=prompt, max_tokens=max_tokens, sink=sink, temperature=parsed.temperature,
                                top_p=parsed.top_p, top_k=parsed.top_k, seed=parsed.seed, stop_ids=stop_ids)
        try:
            engine.check(request)
        except InputError as e:  # (everything it checks was checked above, with the field named)
            raise APIError(str(e)) from None
        return request

    def text_stream(self, parsed: Parsed, prompt: list[int], stop_ids) -> TextStream | None:
        if self.tokenizer is None:
            if parsed.stop:
                raise APIError("stop strings need a tokenizer, and this model has none", param="stop")
            return None
        splitter = None
        if parsed.chat and self.reasoning:
            splitter = ReasoningSplitter(prompt_opens_thinking(self.tokenizer, prompt))
        tok = self.tokenizer
        return TextStream(lambda ids: decode(tok, ids), parsed.stop, stop_ids, splitter=splitter)

    async def _received(self, http: Request, chat: bool) -> tuple[Parsed, list[int]]:
        """The request's body read and prepared (bounded in size, time and memory)."""
        with self.budget.hold() as share:
            raw = await read_body(http, self.limits, share)
            try:
                return await self.offload.run(self.prepare, raw, chat)
            except PrepareTimeout:
                raise APIError(f"preparing the request (parsing, chat template, tokenization) took more than "
                               f"{self.limits.prepare_timeout:g} s (--prepare-timeout): send a smaller one",
                               param="messages" if chat else "prompt", code="prepare_timeout") from None
            except WorkersBusy as e:
                raise APIError(f"the server is busy preparing other requests ({e}); retry in {self.retry_after} s",
                               status=503, type="server_overloaded", code="server_busy",
                               headers={"Retry-After": str(self.retry_after)}) from None

    async def _unless_closing(self, work):
        """Awaits ``work``, or answers 503 as soon as the server begins to shut down."""
        task = asyncio.ensure_future(work)
        closing = asyncio.ensure_future(self._closing().wait())
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not task.done():
                task.cancel()
        if self._closing().is_set() or not task.done() or task.cancelled():
            if task.done() and not task.cancelled():
                task.exception()  # (retrieved: whatever it was, the answer is that the server is stopping)
            raise _shutting_down()
        return task.result()

    def _closing(self) -> asyncio.Event:
        if self.closing is None:
            self.closing = asyncio.Event()
        return self.closing

    async def generate(self, http: Request, chat: bool):
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            if self._closing().is_set():
                raise _shutting_down()
            parsed, prompt = await self._unless_closing(self._received(http, chat))
            sink = _Sink(asyncio.get_running_loop(), None)
            request = self.engine_request(parsed, prompt, sink)
            sink.text = self.text_stream(parsed, prompt, request.stop_ids)
            try:
                self.engine.submit(request)
            except QueueFull as e:
                with self.metrics.lock:
                    self.metrics.rejected += 1
                raise APIError(f"the server is busy: {e}; retry in {self.retry_after} s", status=503,
                               type="server_overloaded", code="queue_full",
                               headers={"Retry-After": str(self.retry_after)}) from None
            except EngineClosed:
                raise _shutting_down() from None
            except InputError as e:
                raise APIError(str(e)) from None
            except RuntimeError as e:
                raise APIError(str(e), status=503, type="server_error", code="engine_failed") from None
        except APIError as e:
            self.metrics.request_done(endpoint, e.status)
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except ClientDisconnect:  # the client left while sending its body: nobody to answer
            self.metrics.request_done(endpoint, 499)
            return Response(status_code=499)
        if parsed.stream:
            return StreamingResponse(self._stream(parsed, request, sink, endpoint), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(http, parsed, request, sink, endpoint)

    async def begin_shutdown(self) -> None:
        """Ends every request in flight with a 503 (``code: server_shutting_down``) and refuses new ones;
        logs how many were ended, once. Called when the HTTP server begins its graceful shutdown."""
        self._closing().set()
        ended = await asyncio.to_thread(self.engine.shutdown)
        self.offload.shutdown()
        if ended:
            logger.warning("shutting down: %d request%s still running or waiting ended with 503 "
                           "(server_shutting_down)", ended, "" if ended == 1 else "s")

    def _finished(self, request: EngineRequest, sink: _Sink, reason: str, stats: RequestStats) -> dict[str, int]:
        completion = len(sink.kept())
        self.metrics.finished(stats.prompt_tokens, completion, stats.accept_lengths, stats.ttft_seconds,
                              time.perf_counter() - request.submitted)
        return usage(stats.prompt_tokens, completion)

    async def _whole(self, http: Request, parsed: Parsed, request: EngineRequest, sink: _Sink, endpoint: str):
        # A client that goes away cancels the request at once (its row is freed at the next chunk boundary).
        watcher = asyncio.create_task(_watch_disconnect(http, lambda: (request.cancel(), sink.gone())))
        try:
            text: list[str] = []
            while True:
                item = await sink.queue.get()
                if isinstance(item, GoneEvent):
                    self.metrics.request_done(endpoint, 499)
                    return Response(status_code=499)
                if isinstance(item, DeltaEvent):
                    text.append(item.delta.content)
                    continue
                reason, stats = item.reason, item.stats
                use = self._finished(request, sink, reason, stats)
                if reason not in FINISH:
                    error = _generation_error(reason, request)
                    self.metrics.request_done(endpoint, error.status)
                    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
                content, thought = "".join(text), None
                if sink.text is not None and sink.text.splitter is not None:  # the library's split of the text
                    thought, content = reasoning_and_answer(sink.text.text, sink.text.splitter.opened)
                body = response(new_id(parsed.chat), parsed.model, parsed.chat, content, thought, FINISH[reason],
                                use)
                if parsed.return_token_ids or sink.text is None:  # without a tokenizer the token ids are the reply
                    body["choices"][0].update(token_ids=sink.kept(), prompt_token_ids=request.prompt)
                self.metrics.request_done(endpoint, 200)
                return JSONResponse(body)
        finally:
            watcher.cancel()

    async def _stream(self, parsed: Parsed, request: EngineRequest, sink: _Sink, endpoint: str):
        rid, created, ended = new_id(parsed.chat), int(time.time()), False
        status = 200
        try:
            if parsed.chat:
                yield _sse(chunk(rid, parsed.model, True, created, role=True, content=""))
            while True:
                item = await sink.queue.get()
                if isinstance(item, DeltaEvent):
                    delta, ids = item.delta, item.token_ids
                    with_ids = (parsed.return_token_ids or sink.text is None) and ids
                    if not delta and not with_ids:
                        continue  # nothing to say (text held back): no empty chunk
                    body = chunk(rid, parsed.model, parsed.chat, created, content=delta.content or None,
                                 reasoning=delta.reasoning or None)
                    if with_ids:
                        body["choices"][0]["token_ids"] = ids
                    yield _sse(body)
                    continue
                if isinstance(item, GoneEvent):  # (a stream notices its client's end through the generator)
                    return
                reason, stats = item.reason, item.stats
                ended = True
                use = self._finished(request, sink, reason, stats)
                if reason not in FINISH:
                    error = _generation_error(reason, request)
                    status = error.status
                    yield _sse(error.body())
                elif parsed.include_usage:  # OpenAI's way: usage only on a last chunk without choices
                    yield _sse(chunk(rid, parsed.model, parsed.chat, created, finish=FINISH[reason],
                                     content=None if parsed.chat else ""))
                    yield _sse(chunk(rid, parsed.model, parsed.chat, created, use=use, choices=False))
                else:  # usage on the finishing chunk
                    yield _sse(chunk(rid, parsed.model, parsed.chat, created, finish=FINISH[reason], use=use,
                                     content=None if parsed.chat else ""))
                yield "data: [DONE]\n\n"
                return
        finally:
            if not ended:  # the client went away (the response was cancelled): free the row
                request.cancel()
                status = 499
            self.metrics.request_done(endpoint, status)


async def _watch_disconnect(http: Request, on_gone: Callable[[], Any]) -> None:
    """Calls ``on_gone()`` when the client disconnects (its body already read: the next ASGI message is the
    disconnect, whenever it comes)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            on_gone()
            return


def _shutting_down() -> APIError:
    return APIError("the server is shutting down; the request was not completed (retry on another server, or "
                    "once this one is back)", status=503, type="server_error", code="server_shutting_down",
                    headers={"Connection": "close"})


def _generation_error(reason: str, request: EngineRequest) -> APIError:
    if reason == "shutdown":
        return _shutting_down()
    if reason == "nonfinite":
        return APIError("the model produced non-finite logits (NaN or Inf): its weights are broken or the dtype "
                        "overflows; the generation was stopped", status=500, type="server_error", code="nonfinite")
    if request.error is not None:
        return APIError(f"the request failed: {request.error}", status=500, type="server_error",
                        code="request_failed")
    return APIError("the engine failed while generating; see the server's log", status=500, type="server_error",
                    code="engine_failed")


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def reasoning_model(tokenizer: Any) -> bool:
    """Whether a tokenizer knows ``</think>`` as one token (Qwen3's thinking models)."""
    try:
        return THINK_END in tokenizer.get_vocab()
    except Exception:
        return False


def create_app(server: Server, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The ASGI application serving ``server``; ``on_ready()`` is called once it has started."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="eagle3-jax", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = APIError(str(exc.detail), status=exc.status_code, type=kind)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception):
        logger.exception("unexpected error")
        error = APIError(f"internal error ({type(exc).__name__})", status=500, type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "eagle3-jax", "max_model_len": server.engine.capacity}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.generate(request, chat=True)

    @app.get("/health")
    async def health():
        if server.engine.error is not None:
            return JSONResponse({"status": "failed", "error": str(server.engine.error)}, status_code=503)
        return {"status": "ok", "running": server.engine.running(), "waiting": server.engine.queue_depth()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
