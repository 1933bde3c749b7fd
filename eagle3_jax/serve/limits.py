"""What a client may send the server, and in how much time (docs/bad-input.md#the-server).

Every limit is checked before the work it protects, so that no request can
stall the server or exhaust its memory:

- the body's size (``Content-Length`` before anything is read, then every
  chunk as it arrives: 413), the time the whole body may take to arrive
  (408), and the bytes of bodies buffered at once by all requests together
  (503 beyond :attr:`Limits.buffered_bytes`);
- in the worker that parses it (:mod:`eagle3_jax.serve.offload`): the JSON's
  nesting depth and valid Unicode in every string (:func:`decode_json`);
- then the request's fields (:func:`~eagle3_jax.serve.protocol.parse_request`):
  the prompt's characters, the number of messages, the stop strings' number
  and length;
- the time the chat template and the tokenizer may take
  (:attr:`Limits.prepare_timeout`, enforced by interrupting the worker);
- at the connection level (``serve/http.py``): the time a client may take to
  send its request line and headers, and the number of connections.

Each of them is a ``serve`` option (:class:`~eagle3_jax.serve.protocol.Limits` has the defaults).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from starlette.requests import ClientDisconnect, Request

from eagle3_jax.serve.protocol import APIError, Limits


def default_prompt_chars(capacity: int, tokenizer: Any = None) -> int:
    """Characters a text prompt may have by default: four times the most the cache could ever hold.

    A token covers at most as many characters as the longest entry of the vocabulary (byte-level entries
    spell one character per byte), so a text longer than ``capacity`` times that can never fit; the factor
    four leaves room for normalisation (NFC composes up to four code points into one). Without a tokenizer,
    64 characters per token.
    """
    longest = 64
    if tokenizer is not None:
        try:
            longest = max(len(piece) for piece in tokenizer.get_vocab())
        except Exception:  # a tokenizer without a readable vocabulary: the fixed bound
            pass
    return 4 * capacity * max(longest, 1)


class BodyBudget:
    """Bytes of request bodies buffered at once, all requests together (used on the event loop only)."""

    def __init__(self, total: int):
        self.total, self.used = total, 0

    @contextlib.contextmanager
    def hold(self):
        """A request's share: ``take(n)`` counts bytes against the budget; all are given back at the end."""
        share = _Share(self)
        try:
            yield share
        finally:
            self.used -= share.bytes


class _Share:
    def __init__(self, budget: BodyBudget):
        self.budget, self.bytes = budget, 0

    def take(self, n: int) -> bool:
        if self.budget.used + n > self.budget.total:
            return False
        self.budget.used += n
        self.bytes += n
        return True


async def read_body(http: Request, limits: Limits, share: _Share) -> bytes:
    """The request's body, within the limits: 413 past ``max_body_bytes`` (said by ``Content-Length`` or
    counted as it arrives), 408 when it takes longer than ``body_timeout``, 503 when the bodies buffered by
    all requests would pass their budget. Raises :class:`ClientDisconnect` when the client leaves."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(limits, f"Content-Length says {int(declared)}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(limits.body_timeout):
            async for chunk in http.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise _too_large(limits, f"more than {limits.max_body_bytes} arrived")
                if not share.take(len(chunk)):
                    raise APIError("the server is busy receiving other requests; retry in 1 s", status=503,
                                   type="server_overloaded", code="server_busy",
                                   headers={"Retry-After": "1"})
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(f"the request body did not arrive within {limits.body_timeout:g} s (--body-timeout)",
                       status=408, code="request_timeout", headers={"Connection": "close"}) from None
    return b"".join(chunks)


def _too_large(limits: Limits, what: str) -> APIError:
    return APIError(f"the request body is too large ({what}; at most {limits.max_body_bytes} bytes, "
                    "--max-body-bytes)", status=413, code="request_too_large")


def decode_json(raw: bytes, limits: Limits) -> Any:
    """The body's JSON value, nested at most ``max_json_depth`` deep, with valid Unicode in every string
    and key (JSON's ``\\ud800`` escapes can make lone surrogates); APIError 400 otherwise."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise _too_deep(limits.max_json_depth, None) from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, bad UTF-8, an integer of 5000 digits
        raise APIError(f"the request body is not valid JSON ({str(e)[:200]})") from None
    check_json(value, limits.max_json_depth)
    return value


def check_json(value: Any, max_depth: int) -> None:
    """APIError 400 if ``value`` nests deeper than ``max_depth`` or holds a string (or key) that is not
    valid Unicode, naming the top-level field it is under. Iterative: no depth can exhaust the stack."""
    stack: list[tuple[Any, int, str | None]] = [(value, 1, None)]
    while stack:
        item, depth, field = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                raise _too_deep(max_depth, field)
            for key, child in item.items():
                name = key if field is None else field
                _check_unicode(key, name)
                stack.append((child, depth + 1, name))
        elif isinstance(item, list):
            if depth > max_depth:
                raise _too_deep(max_depth, field)
            stack.extend((child, depth + 1, field) for child in item)
        elif isinstance(item, str):
            _check_unicode(item, field)


def _too_deep(max_depth: int, field: str | None) -> APIError:
    return APIError(f"the request body is nested more than {max_depth} levels deep "
                    "(--max-json-depth)", param=field, code="too_deep")


def _check_unicode(text: str, field: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = f"'{field}'" if field is not None else "the request body"
        raise APIError(f"{where} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start} of "
                       "a string), which is not valid Unicode text", param=field) from None


__all__ = ["BodyBudget", "ClientDisconnect", "Limits", "check_json", "decode_json", "default_prompt_chars",
           "read_body"]
