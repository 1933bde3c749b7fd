"""The OpenAI API's requests and responses: parsing with clear errors, and the JSON bodies.

A request body is checked field by field (types are not coerced: a string
``max_tokens`` is an error, not a number) and becomes a :class:`Parsed`
request; any problem is an :class:`APIError` that the server sends as
OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.
Fields the server does not know are ignored, as OpenAI-compatible servers
do; fields it knows but can not honour (``n`` > 1, ``logprobs``, tools,
penalties) are refused.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

from eagle3_jax.errors import InputError
from eagle3_jax.sampling import MAX_TOP_K
from eagle3_jax.text import check_template_kwargs
from eagle3_jax.validation import MAX_SEED, is_int


class APIError(Exception):
    """An error answered with an OpenAI-style body.

    Attributes:
      status: the HTTP status (400 bad request, 404, 503 overloaded, 500).
      message, type, param, code: the body's fields.
      headers: extra response headers (``Retry-After`` on 503).
    """

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Defaults:
    """Sampling defaults for requests that leave them out (the model's generation_config.json, else OpenAI's)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a client may send, and in how much time (the ``serve`` options of the same names; enforced by
    :func:`parse_request` and :mod:`eagle3_jax.serve.limits`).

    Attributes:
      max_body_bytes: a request body's bytes at most (413 beyond).
      max_json_depth: nesting of arrays and objects in a body at most (400 beyond).
      max_prompt_chars: characters of a text prompt, or of all a chat's messages together, at most (400
        beyond); None until the server resolves it (``limits.default_prompt_chars``); unchecked while None.
      max_messages: messages in a chat at most.
      max_stop_strings, max_stop_chars: stop strings per request, and characters per stop string, at most.
      prepare_timeout: seconds a request's preparation (JSON parsing, chat template, tokenization) may take
        on its worker before it is interrupted (400, ``code: prepare_timeout``).
      header_timeout: seconds a client may take to send a request's line and headers; the connection is
        closed after that.
      body_timeout: seconds a request's whole body may take to arrive (408 after that).
      max_connections: open connections at most; a request on a connection beyond them gets 503.
      prepare_workers: threads that prepare requests.
    """

    max_body_bytes: int = 2 * MiB
    max_json_depth: int = 32
    max_prompt_chars: int | None = None
    max_messages: int = 1024
    max_stop_strings: int = 16
    max_stop_chars: int = 1024
    prepare_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1024
    prepare_workers: int = 4

    @property
    def buffered_bytes(self) -> int:
        """Bytes of request bodies held at once, all requests together: 16 maximal bodies."""
        return 16 * self.max_body_bytes


@dataclasses.dataclass
class Parsed:
    """A checked request.

    Attributes:
      chat: a chat completion (else a completion).
      prompt: the prompt's text, its token ids, or the chat's messages.
      max_tokens: None: as many as the cache holds.
      stop: stop strings; stop_token_ids: extra stop tokens.
      ignore_eos: do not stop at the model's eos tokens.
      include_usage: the stream ends with a usage chunk (``stream_options``).
      return_token_ids: the choices carry ``token_ids`` (and ``prompt_token_ids``), as vLLM's option.
    """

    chat: bool
    model: str
    prompt: Any
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    chat_template_kwargs: dict[str, Any]
    return_token_ids: bool = False
    max_tokens_name: str = "max_tokens"  # the field it came from (max_completion_tokens in a chat)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _shown(value: Any) -> str:
    """A number as an error message shows it: an integer of thousands of digits (JSON allows them) cut short."""
    text = repr(value) if isinstance(value, float) else str(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text.lstrip('-'))} digits)"


def _int(body: Mapping, name: str, *, default: Any, minimum: int | None = None, maximum: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value):
        raise APIError(f"'{name}' must be an integer, got {_type_name(value)}", param=name)
    if minimum is not None and value < minimum:
        raise APIError(f"'{name}' must be at least {minimum}, got {_shown(value)}", param=name)
    if maximum is not None and value > maximum:
        raise APIError(f"'{name}' must be at most {maximum}, got {_shown(value)}", param=name)
    return int(value)


def _number(body: Mapping, name: str, *, default: float, minimum: float, maximum: float, open_min: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(f"'{name}' must be a number, got {_type_name(value)}", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(f"'{name}' must be a finite number, got {value}", param=name)
    # (an int is compared as it is: float() of one with hundreds of digits overflows)
    low_ok = value > minimum if open_min else value >= minimum
    if not low_ok or value > maximum:
        raise APIError(f"'{name}' must be {'>' if open_min else '>='} {minimum} and <= {maximum}, got "
                       f"{_shown(value)}", param=name)
    return float(value)


def _bool(body: Mapping, name: str, default: bool = False, *, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"'{param or name}' must be true or false, got {_type_name(value)}", param=param or name)
    return value


def _object(body: Mapping, name: str) -> dict[str, Any]:
    """An object field; null or absent is {} (a falsy value of another type is an error, not absent)."""
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise APIError(f"'{name}' must be an object, got {_type_name(value)}", param=name)
    return value


def _token_ids(value: Any, name: str, vocab_size: int | None) -> list[int]:
    if not isinstance(value, list) or not all(is_int(t) for t in value):
        raise APIError(f"'{name}' must be a list of integer token ids", param=name)
    _check_vocab([int(t) for t in value], name, vocab_size)
    return [int(t) for t in value]


def _check_vocab(ids: list[int], name: str, vocab_size: int | None) -> None:
    outside = [t for t in ids if vocab_size is not None and not 0 <= t < vocab_size]
    if outside:
        raise APIError(f"'{name}' has token ids outside the vocabulary [0, {vocab_size}): {outside[:5]}",
                       param=name)


# Fields the server knows but can not honour: (the JSON types a value may have, whether a value means "off").
# A value of another type is a type error; a value that asks for the feature is refused as unsupported.
UNSUPPORTED: dict[str, tuple[tuple[type, ...], Any]] = {
    "n": ((int,), lambda v: v == 1),
    "best_of": ((int,), lambda v: v == 1),
    "logprobs": ((bool, int), lambda v: v is False or v == 0),
    "top_logprobs": ((int,), lambda v: v == 0),
    "tools": ((list,), lambda v: not v),
    "functions": ((list,), lambda v: not v),
    "logit_bias": ((dict,), lambda v: not v),
    "presence_penalty": ((int, float), lambda v: v == 0),
    "frequency_penalty": ((int, float), lambda v: v == 0),
    "suffix": ((str,), lambda v: v == ""),
    "response_format": ((dict,), lambda v: v == {} or v == {"type": "text"}),
    "echo": ((bool,), lambda v: v is False),
}
_TYPE_WORDS = {int: "an integer", bool: "a boolean", list: "an array", dict: "an object", float: "a number",
               str: "a string"}


def _check_unsupported(body: Mapping) -> None:
    for name, (types, off) in UNSUPPORTED.items():
        value = body.get(name)
        if value is None:
            continue
        ok_type = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not ok_type:
            words = " or ".join(dict.fromkeys(_TYPE_WORDS[t] for t in types))
            raise APIError(f"'{name}' must be {words}, got {_type_name(value)}", param=name)
        if not off(value):
            raise APIError(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def _check_messages(value: Any, limits: Limits) -> list[dict]:
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise APIError("'messages' must be a non-empty array of message objects like "
                       '{"role": "user", "content": "..."}', param="messages")
    if len(value) > limits.max_messages:
        raise APIError(f"'messages' holds {len(value)} messages; this server takes at most {limits.max_messages} "
                       "(--max-messages)", param="messages", code="too_many_messages")
    chars = 0
    for i, m in enumerate(value):
        if not isinstance(m.get("role"), str):
            raise APIError(f"message {i} needs a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(f"message {i}: only text content parts are supported", param="messages")
            m["content"] = "".join(p["text"] for p in content)
        elif content is not None and not isinstance(content, str):
            raise APIError(f"message {i}: 'content' must be a string, got {_type_name(content)}",
                           param="messages")
        chars += _text_chars(m)
    _check_chars(chars, "messages", limits, what="the messages have")
    return value


def _text_chars(value: Any) -> int:
    """Characters of every string in ``value`` (a message: content, reasoning, names, ...)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


def _check_chars(chars: int, name: str, limits: Limits, *, what: str) -> None:
    if limits.max_prompt_chars is not None and chars > limits.max_prompt_chars:
        raise APIError(f"{what} {chars} characters; this server takes at most {limits.max_prompt_chars} "
                       f"(--max-prompt-chars: text that long can not fit its KV cache)", param=name,
                       code="context_length_exceeded")


def parse_request(body: Any, *, chat: bool, model_names: tuple[str, ...], defaults: Defaults,
                  limits: Limits | None = None, vocab_size: int | None = None) -> Parsed:
    """Checks a /v1/completions (``chat`` False) or /v1/chat/completions body; raises APIError (400, naming
    the offending field as ``param``). Token ids must be in [0, vocab_size) (None: not checked here)."""
    limits = limits or Limits()
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {_type_name(body)}")
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError("'model' is required: a string naming the served model "
                       f"({', '.join(model_names)})", param="model")
    if model not in model_names:
        raise APIError(f"the model {model[:200]!r} does not exist; this server serves {model_names[0]}",
                       param="model", code="model_not_found")
    _check_unsupported(body)
    if chat:
        prompt = _check_messages(body.get("messages"), limits)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list):
            if prompt and all(isinstance(p, (str, list)) for p in prompt):
                raise APIError("one prompt per request: send several requests (they are batched together)",
                               param="prompt")
            prompt = _token_ids(prompt, "prompt", vocab_size)
        elif isinstance(prompt, str):
            _check_chars(len(prompt), "prompt", limits, what="the prompt has")
        else:
            raise APIError(f"'prompt' must be a string or a list of token ids, got {_type_name(prompt)}",
                           param="prompt")
        if not prompt:
            raise APIError("'prompt' is empty", param="prompt")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, name, default=None, minimum=1)
    temperature = _number(body, "temperature", default=defaults.temperature, minimum=0.0, maximum=2.0)
    top_p = _number(body, "top_p", default=defaults.top_p, minimum=0.0, maximum=1.0, open_min=True)
    top_k = _int(body, "top_k", default=defaults.top_k, minimum=-1, maximum=MAX_TOP_K)
    seed = _int(body, "seed", default=None, minimum=0, maximum=MAX_SEED)
    stop_token_ids = body.get("stop_token_ids")
    stop_ids = [] if stop_token_ids is None else _token_ids(stop_token_ids, "stop_token_ids", vocab_size)
    stops = _stops(body.get("stop"), stop_ids, limits, vocab_size)
    stream = _bool(body, "stream")
    include_usage = _bool(_object(body, "stream_options"), "include_usage", param="stream_options.include_usage")
    template_kwargs = _object(body, "chat_template_kwargs")
    try:
        check_template_kwargs(template_kwargs)
    except InputError as e:
        raise APIError(str(e), param="chat_template_kwargs") from None
    return Parsed(chat=chat, model=model, prompt=prompt, max_tokens=max_tokens,
                  temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
                  seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed,
                  stop=tuple(dict.fromkeys(stops)), stop_token_ids=tuple(dict.fromkeys(stop_ids)), stream=stream,
                  include_usage=include_usage, ignore_eos=_bool(body, "ignore_eos"),
                  chat_template_kwargs=dict(template_kwargs), return_token_ids=_bool(body, "return_token_ids"),
                  max_tokens_name=name)


def _stops(value: Any, stop_ids: list[int], limits: Limits, vocab_size: int | None) -> list[str]:
    """The stop strings of ``stop`` (a string or an array); integer entries are token ids, added to ``stop_ids``."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise APIError(f"'stop' must be a string or an array, got {_type_name(value)}", param="stop")
    stops: list[str] = []
    for s in value:
        if isinstance(s, str) and s:
            if len(s) > limits.max_stop_chars:
                raise APIError(f"a stop string has {len(s)} characters; at most {limits.max_stop_chars} "
                               "(--max-stop-chars)", param="stop")
            stops.append(s)
        elif is_int(s):
            _check_vocab([int(s)], "stop", vocab_size)
            stop_ids.append(int(s))  # a token id
        else:
            raise APIError("'stop' entries must be non-empty strings (or integer token ids)", param="stop")
    if len(set(stops)) > limits.max_stop_strings:
        raise APIError(f"{len(set(stops))} stop strings; at most {limits.max_stop_strings} (--max-stop-strings)",
                       param="stop")
    return stops


# ------------------------------------------------------------------ responses

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(request_id: str, model: str, chat: bool, text: str, reasoning: str | None, finish: str,
             use: dict[str, int], created: int | None = None) -> dict[str, Any]:
    """A whole (non-streamed) response."""
    created = int(time.time()) if created is None else created
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": use}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": use}


def chunk(request_id: str, model: str, chat: bool, created: int, *, content: str | None = None,
          reasoning: str | None = None, role: bool = False, finish: str | None = None,
          use: dict[str, int] | None = None, choices: bool = True) -> dict[str, Any]:
    """One streamed chunk (OpenAI's chunk format); ``choices=False`` is the final usage-only chunk."""
    if chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if content is not None:
            delta["content"] = content
        if reasoning is not None:
            delta["reasoning_content"] = reasoning
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
    else:
        choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
        body = {"id": request_id, "object": "text_completion", "created": created, "model": model}
    body["choices"] = [choice] if choices else []
    if use is not None:
        body["usage"] = use
    return body
