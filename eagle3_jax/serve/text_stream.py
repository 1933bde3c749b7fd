"""Tokens to streamed text: incremental detokenization, stop strings and the reasoning split.

:class:`TextStream` turns a request's tokens, as the engine commits them,
into text deltas: it decodes the whole reply so far and sends what is new,
holding back an incomplete UTF-8 character (a byte-level token can end
inside one) and any end of the text that could begin a stop string. Once
the text holds a stop string, the text is cut before it and the request
ends (finish_reason 'stop'). The final stop token (eos) is never text.

:class:`ReasoningSplitter` splits the text of a thinking model's reply into
``reasoning_content`` and ``content`` deltas at ``</think>``, as the Qwen3
reasoning parsers of vLLM and SGLang do: the reply is reasoning from its
start when the prompt opened ``<think>`` (Qwen3-Thinking-2507's template
does) or when the reply itself opens it (hybrid Qwen3 models); otherwise it
is all content.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from eagle3_jax.text import THINK_END, THINK_START, covering_prefix, find_stop, partial_stop_length

REPLACEMENT = "\ufffd"  # what a tokenizer decodes a partial UTF-8 character to


@dataclasses.dataclass
class Delta:
    """Text to send: ``reasoning`` (reasoning_content) and ``content``; either may be ''."""

    content: str = ""
    reasoning: str = ""

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning)


class ReasoningSplitter:
    """Splits streamed text at ``</think>`` into reasoning and content (see the module docstring).

    Args:
      opened: the prompt ended inside an open ``<think>`` block.
    """

    def __init__(self, opened: bool = False):
        self.opened = opened
        self.mode = "reasoning" if opened else "start"  # start: not yet known whether the reply opens <think>
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> Delta:
        """The delta for new ``text``; ``final`` flushes what was held back."""
        self.pending += text
        out = Delta()
        while True:
            if self.mode == "start":
                head = self.pending.lstrip()
                if head.startswith(THINK_START):
                    self.pending, self.mode = head[len(THINK_START):], "reasoning"
                    continue
                if THINK_START.startswith(head) and head and not final:
                    return out  # could still become <think>
                if not head and not final:
                    return out  # only whitespace so far
                self.mode = "content"
                continue
            if self.mode == "reasoning":
                at = self.pending.find(THINK_END)
                if at >= 0:
                    out.reasoning += self.pending[:at]
                    self.pending, self.mode = self.pending[at + len(THINK_END):], "answer-start"
                    continue
                keep = 0 if final else partial_stop_length(self.pending, (THINK_END,))
                out.reasoning += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                return out
            if self.mode == "answer-start":  # the answer's leading newlines are not sent
                self.pending = self.pending.lstrip()
                if not self.pending:
                    return out
                self.mode = "content"
            out.content += self.pending
            self.pending = ""
            return out


class TextStream:
    """A request's text as its tokens arrive (see the module docstring).

    Decoding is incremental (the offsets vLLM uses): each call decodes the
    new tokens with a few tokens of left context, never the whole reply, so
    a long reply costs the engine's thread no more per chunk than a short one.

    Args:
      decode: token ids -> text (special tokens skipped).
      stops: stop strings; stop_ids: stop tokens (one ending the reply is not text).
      include_stop: keep the stop string at the end of the text.
      splitter: a :class:`ReasoningSplitter` for chat replies of thinking models, or None.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str] = (),
                 stop_ids: Sequence[int] = (), include_stop: bool = False, splitter: ReasoningSplitter | None = None):
        self.decode, self.stops, self.stop_ids = decode, tuple(stops), frozenset(stop_ids)
        self.include_stop, self.splitter = include_stop, splitter
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.full = ""  # the reply's text decoded so far
        self.sent = 0  # characters of ``full`` handed on
        self._prefix = self._read = 0  # full holds the text of body[:_read]; body[_prefix:_read] is the context
        self.stopped = False  # a stop string was found
        self.kept_tokens: int | None = None  # with a stop string: the tokens that cover the text

    @property
    def text(self) -> str:
        """The text handed on so far (after :meth:`finish`: the reply's whole text)."""
        return self.full[: self.sent]

    def add(self, ids: Sequence[int]) -> tuple[Delta, bool]:
        """(the delta to send, whether the text now holds a stop string: the request must end)."""
        if self.stopped:
            return Delta(), True
        self.ids.extend(ids)
        return self._advance(final=False)

    def finish(self) -> Delta:
        """The text held back, at the end of the reply."""
        if self.stopped:
            return self._split("", final=True)
        return self._advance(final=True)[0]

    def _body(self) -> list[int]:
        return self.ids[:-1] if self.ids and self.ids[-1] in self.stop_ids else self.ids

    def _advance(self, final: bool) -> tuple[Delta, bool]:
        body = self._body()
        before = len(self.full)
        if len(body) > self._read:
            context = self.decode(body[self._prefix:self._read])
            new = self.decode(body[self._prefix:])
            if final or (len(new) > len(context) and not new.endswith(REPLACEMENT)):
                self.full += new[len(context):]  # an incomplete character waits for its next bytes, unless final
                self._prefix, self._read = self._read, len(body)
        end = len(self.full)
        if self.stops:
            start = max(0, before - self.longest_stop + 1)  # a new stop string ends in the new text
            hit = find_stop(self.full[start:], self.stops)
            if hit is not None:
                end = start + hit[0] + (len(hit[1]) if self.include_stop else 0)
                self.stopped = True
                self.kept_tokens = covering_prefix(self.decode, body, self.full[:end])
                return self._emit(end, final=True), True
            if not final:
                end -= partial_stop_length(self.full, self.stops)
        return self._emit(end, final), False

    def _emit(self, end: int, final: bool) -> Delta:
        new = self.full[self.sent:end]
        self.sent = max(self.sent, end)
        return self._split(new, final)

    def _split(self, new: str, final: bool) -> Delta:
        if self.splitter is None:
            return Delta(content=new)
        return self.splitter.feed(new, final=final)
