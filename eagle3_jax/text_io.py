"""The text side of :class:`~eagle3_jax.generation.Generator`.

Where a generator's tokenizer comes from (:class:`TokenizerSource`), how a
batch of text prompts, chat messages and token ids becomes token ids
(:func:`encode_prompts`), how a row's tokens become its text, cut at a stop
string (:class:`TextOptions`), and how stop strings end rows between chunks
of the compiled decode loop (:class:`StopWatcher`). The string-level rules
(templates, ``</think>``, stop-string matching) are in :mod:`eagle3_jax.text`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eagle3_jax.decoding.common import Finish, finish_reasons
from eagle3_jax.errors import InputError
from eagle3_jax.loading import target_directory
from eagle3_jax.models.target import TargetModel
from eagle3_jax.text import (
    check_messages,
    covering_prefix,
    cut_at_stop,
    decode,
    find_stop,
    has_chat_template,
    has_tokenizer_files,
    is_messages,
    is_tokenizer,
    load_tokenizer,
    render_chat,
    token_ids,
)

NO_TOKENIZER_HINT = ("pass Generator(..., tokenizer=DIR or a tokenizer), or give token ids "
                     "(a list of token-id lists)")


class TokenizerSource:
    """Where a :class:`Generator`'s tokenizer comes from; the target's own is loaded at most
    once, and only when text is needed.

    Args:
      tokenizer: None (the target's own: the tokenizer files in the directory
        :func:`~eagle3_jax.loading.load_target` read it from), a tokenizer
        object (``transformers``), a directory or Hub id (loaded now), or
        False (no tokenizer: token ids only, text fields None).
      target: the target, for its directory.
    """

    _UNSET = object()

    def __init__(self, tokenizer: Any, target: TargetModel):
        self.directory = None
        self.disabled = tokenizer is False
        self._failure = None
        self._value = self._UNSET
        if tokenizer is False:
            self._value = None
        elif tokenizer is None:
            self.directory = target_directory(target)
        elif isinstance(tokenizer, (str, os.PathLike)):
            self._value = load_tokenizer(tokenizer)
        elif is_tokenizer(tokenizer):
            self._value = tokenizer
        else:
            raise InputError("tokenizer must be None (the target's own), a tokenizer object, a directory or Hub "
                             f"id, or False (none), got {type(tokenizer).__name__}")

    def get(self, needed_for: str | None = None):
        """The tokenizer, or None when there is none and ``needed_for`` is None.

        ``needed_for`` names what needs one (e.g. "prompt 0 (text)"): then a
        missing or unloadable tokenizer is an InputError saying so.
        """
        if self._value is self._UNSET:
            self._value = self._load_own(needed_for)
        if self._value is None and needed_for is not None:
            raise InputError(f"{needed_for} needs a tokenizer, and {self._why_none()}; {NO_TOKENIZER_HINT}")
        return self._value

    def _load_own(self, needed_for: str | None):
        if not has_tokenizer_files(self.directory):
            return None
        try:
            return load_tokenizer(self.directory)
        except InputError as e:
            self._failure = str(e)
            if needed_for is None:
                warnings.warn(f"{e}; the outputs have no text", stacklevel=2)
            return None

    def _why_none(self) -> str:
        if self.disabled:
            return "the Generator was made with tokenizer=False"
        if self._failure:
            return self._failure
        if self.directory is None:
            return "the target has none of its own (it was not loaded by load_target from a directory)"
        return f"the target's directory {self.directory} has no tokenizer files"


def _as_batch(prompts: Any) -> Any:
    """A single text or chat as a batch of one; anything else as it is (token ids are sorted out later)."""
    if isinstance(prompts, str) or is_messages(prompts):
        return [prompts]
    return prompts


def _holds_text(batch: Any) -> bool:
    return (isinstance(batch, Sequence) and not isinstance(batch, (str, bytes))
            and any(isinstance(p, str) or is_messages(p) for p in batch))


def encode_prompts(tokenizers: TokenizerSource, prompts: Any,
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> Any:
    """The batch with its text prompts tokenized and its chats rendered by the chat template
    (``add_generation_prompt``) and tokenized; token-id prompts pass through unchecked."""
    batch = _as_batch(prompts)
    if not _holds_text(batch):
        return prompts
    out = []
    for i, p in enumerate(batch):
        where = f"prompt {i}"
        if isinstance(p, str):
            out.append(token_ids(tokenizers.get(f"{where} (text)"), p, where=where))
        elif is_messages(p):
            tokenizer = tokenizers.get(f"{where} (a list of chat messages)")
            if not has_chat_template(tokenizer):
                raise InputError(f"{where} is a list of chat messages, but the tokenizer has no chat template; "
                                 "give the prompt as text or token ids instead")
            text = render_chat(tokenizer, check_messages(p, where=where), where=where, **chat_template_kwargs or {})
            out.append(token_ids(tokenizer, text, where=where))
        else:
            out.append(p)
    return out


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """How outputs become text: the tokenizer, the stop strings and whether the text keeps the one it stopped at."""

    tokenizer: Any
    stops: tuple[str, ...] = ()
    include_stop: bool = False

    def decode(self, ids: Sequence[int]) -> str:
        return decode(self.tokenizer, ids)

    def row(self, ids: list[int], reason: str | None) -> tuple[list[int], str, str | None]:
        """(token ids, text, finish reason) of a row: the text without a final stop token, cut at
        its first stop string (then the ids are those covering the text and the reason is 'stop')."""
        body = ids[:-1] if reason == "eos" else ids
        text = self.decode(body)
        cut = cut_at_stop(text, self.stops, self.include_stop) if self.stops else None
        if cut is None:
            return ids, text, reason
        return body[: covering_prefix(self.decode, body, cut)], cut, "stop"


class StopWatcher:
    """Ends the rows whose text holds a stop string, between chunks of the decode loop.

    Each check decodes only what could hold a new occurrence (the tokens added
    since the last check and a look-back), and confirms a hit on the row's
    whole text before ending the row. ``kept[row]`` is then the number of
    tokens the row keeps (what streaming may emit).
    """

    def __init__(self, text: TextOptions, rows: int):
        self.text = text
        self.lookback = 4 * max(len(s) for s in text.stops) + 8  # a character is at most 4 byte-level tokens
        self.checked = [0] * rows
        self.kept: list[int | None] = [None] * rows
        self.unreadable: set[int] = set()  # rows the tokenizer could not decode: no stop strings checked

    def check(self, tokens: np.ndarray, counts: np.ndarray, codes: np.ndarray) -> bool:
        """Marks the running rows whose text now holds a stop string as stopped (``codes[row]`` set to
        ``Finish.STOP``, in place); returns whether any was.

        Args:
          tokens: [batch, width] the rows' generated tokens (host); counts: [batch] how many are valid.
          codes: [batch] the rows' finish codes (host, :class:`~eagle3_jax.decoding.common.Finish`).
        """
        reasons = finish_reasons(codes)
        ended = False
        for row, n in enumerate(int(c) for c in counts):
            if self.kept[row] is not None or row in self.unreadable or n <= self.checked[row]:
                continue
            start, self.checked[row] = max(0, self.checked[row] - self.lookback), n
            ids = tokens[row, :n].tolist()
            try:
                if find_stop(self.text.decode(ids[start:]), self.text.stops) is None:
                    continue
                kept, _, reason = self.text.row(ids, reasons[row])
            except Exception as e:  # a broken vocabulary: the row runs on without its stop strings
                warnings.warn(f"the tokenizer could not decode row {row} ({type(e).__name__}: {e}); its stop "
                              "strings are not checked", stacklevel=3)
                self.unreadable.add(row)
                continue
            if reason != "stop":
                continue
            self.kept[row] = len(kept)
            if codes[row] == Finish.RUNNING:
                codes[row], ended = Finish.STOP, True
        return ended
