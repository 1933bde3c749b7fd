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
        self.ids: list[int] = []
        self.sent = 0  # characters of the text sent
        self.text = ""  # the text sent so far
        self.stopped = False  # a stop string was found
        self.kept_tokens: int | None = None  # with a stop string: the tokens that cover the text

    def add(self, ids: Sequence[int]) -> tuple[Delta, bool]:
        """(the delta to send, whether the text now holds a stop string: the request must end)."""
        if self.stopped:
            return Delta(), True
        self.ids.extend(ids)
        body = self.ids[:-1] if self.ids and self.ids[-1] in self.stop_ids else self.ids
        full = self.decode(body)
        if self.stops:
            hit = find_stop(full, self.stops)
            if hit is not None:
                cut = full[: hit[0] + (len(hit[1]) if self.include_stop else 0)]
                self.stopped = True
                self.kept_tokens = covering_prefix(self.decode, body, cut)
                return self._send(cut, final=True), True
        end = len(full)
        while end > self.sent and full[end - 1] == REPLACEMENT:
            end -= 1  # an incomplete character: wait for its next bytes
        if self.stops:
            end -= partial_stop_length(full[:end], self.stops)
        return self._send(full[: max(end, self.sent)], final=False), False

    def finish(self) -> Delta:
        """The text held back, at the end of the reply."""
        if self.stopped:
            return self._split("", final=True)
        body = self.ids[:-1] if self.ids and self.ids[-1] in self.stop_ids else self.ids
        return self._send(self.decode(body), final=True)

    def _send(self, text: str, final: bool) -> Delta:
        new = text[self.sent:] if text.startswith(self.text) else ""
        self.sent, self.text = len(text), text
        return self._split(new, final)

    def _split(self, new: str, final: bool) -> Delta:
        if self.splitter is None:
            return Delta(content=new)
        return self.splitter.feed(new, final=final)
