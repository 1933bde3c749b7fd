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

from eagle3_jax.checks import MAX_SEED, is_int
from eagle3_jax.sampling import MAX_TOP_K


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


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _int(body: Mapping, name: str, *, default: Any, minimum: int | None = None, maximum: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value):
        raise APIError(f"'{name}' must be an integer, got {_type_name(value)}", param=name)
    if minimum is not None and value < minimum:
        raise APIError(f"'{name}' must be at least {minimum}, got {value}", param=name)
    if maximum is not None and value > maximum:
        raise APIError(f"'{name}' must be at most {maximum}, got {value}", param=name)
    return int(value)


def _number(body: Mapping, name: str, *, default: float, minimum: float, maximum: float, open_min: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(f"'{name}' must be a number, got {_type_name(value)}", param=name)
    low_ok = value > minimum if open_min else value >= minimum
    if not low_ok or value > maximum:
        raise APIError(f"'{name}' must be {'>' if open_min else '>='} {minimum} and <= {maximum}, got {value}",
                       param=name)
    return float(value)


def _bool(body: Mapping, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"'{name}' must be true or false, got {_type_name(value)}", param=name)
    return value


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(is_int(t) and not isinstance(t, bool) for t in value):
        raise APIError(f"'{name}' must be a list of integer token ids", param=name)
    return [int(t) for t in value]


UNSUPPORTED = {
    "n": lambda v: v not in (None, 1), "best_of": lambda v: v not in (None, 1),
    "logprobs": lambda v: v not in (None, False, 0), "top_logprobs": lambda v: v not in (None, 0),
    "tools": lambda v: bool(v), "functions": lambda v: bool(v), "logit_bias": lambda v: bool(v),
    "presence_penalty": lambda v: v not in (None, 0, 0.0), "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "suffix": lambda v: v not in (None, ""), "response_format": lambda v: v not in (None, {"type": "text"}),
}


def parse_request(body: Any, *, chat: bool, model_names: tuple[str, ...], defaults: Defaults) -> Parsed:
    """Checks a /v1/completions (``chat`` False) or /v1/chat/completions body; raises APIError."""
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {_type_name(body)}")
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError("'model' is required: a string naming the served model "
                       f"({', '.join(model_names)})", param="model")
    if model not in model_names:
        raise APIError(f"the model '{model}' does not exist; this server serves {model_names[0]}",
                       param="model", code="model_not_found")
    for name, bad in UNSUPPORTED.items():
        if bad(body.get(name)):
            raise APIError(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    if chat:
        prompt = body.get("messages")
        if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
            raise APIError("'messages' must be a non-empty array of message objects like "
                           '{"role": "user", "content": "..."}', param="messages")
        for i, m in enumerate(prompt):
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
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list):
            if prompt and all(isinstance(p, (str, list)) for p in prompt):
                raise APIError("one prompt per request: send several requests (they are batched together)",
                               param="prompt")
            prompt = _token_ids(prompt, "prompt")
        elif not isinstance(prompt, str):
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
    stop_value = body.get("stop")
    stops: list[str] = []
    stop_ids = list(_token_ids(body["stop_token_ids"], "stop_token_ids")) if body.get("stop_token_ids") else []
    if isinstance(stop_value, str):
        stop_value = [stop_value]
    if stop_value is not None:
        if not isinstance(stop_value, list):
            raise APIError(f"'stop' must be a string or an array, got {_type_name(stop_value)}", param="stop")
        for s in stop_value:
            if isinstance(s, str) and s:
                stops.append(s)
            elif is_int(s) and not isinstance(s, bool):
                stop_ids.append(int(s))  # a token id
            else:
                raise APIError("'stop' entries must be non-empty strings (or integer token ids)", param="stop")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError("'stream_options' must be an object", param="stream_options")
    include_usage = _bool(options or {}, "include_usage")
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise APIError("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    if _bool(body, "echo"):
        raise APIError("'echo' is not supported by this server", param="echo", code="unsupported_parameter")
    return Parsed(chat=chat, model=model, prompt=prompt, max_tokens=max_tokens,
                  temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
                  seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed,
                  stop=tuple(dict.fromkeys(stops)), stop_token_ids=tuple(dict.fromkeys(stop_ids)), stream=stream,
                  include_usage=include_usage, ignore_eos=_bool(body, "ignore_eos"),
                  chat_template_kwargs=dict(template_kwargs), return_token_ids=_bool(body, "return_token_ids"))


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
