"""Text through a model's tokenizer, with the project's own errors.

A chat template is Jinja code shipped with a checkpoint and a tokenizer is a
Rust library: either can raise anything on input it dislikes. These helpers
turn that into an :class:`~eagle3_jax.errors.InputError` that says where it
happened, for the generator, the CLI, evaluation and regeneration alike.

Also here, because they work on decoded text: the split of a thinking
model's reply into reasoning and answer (at ``</think>``), and stop strings.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from eagle3_jax.errors import InputError

THINK_START, THINK_END = "<think>", "</think>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip()[:200]}"


# ----------------------------------------------------------------- tokenizers

def has_tokenizer_files(model_dir: str | os.PathLike | None) -> bool:
    """Whether a local directory holds tokenizer files (no network, nothing loaded)."""
    if model_dir is None or not os.path.isdir(model_dir):
        return False
    return any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES)


_LOADED: dict[tuple, Any] = {}


def _stamp(path: str) -> tuple:
    """What identifies a tokenizer directory's contents cheaply: its files' sizes and mtimes."""
    stats = []
    for name in TOKENIZER_FILES:
        try:
            st = os.stat(os.path.join(path, name))
        except OSError:
            continue
        stats.append((name, st.st_size, st.st_mtime_ns))
    return (os.path.realpath(path), tuple(stats))


def load_tokenizer(path: str | os.PathLike) -> Any:
    """``AutoTokenizer.from_pretrained(path)``, loaded once per directory contents.

    ``path`` is a local directory or a Hub id. Raises InputError, naming the
    path, when it can not be loaded.
    """
    path = os.fspath(path)
    key = _stamp(path) if os.path.isdir(path) else (path,)
    if key not in _LOADED:
        try:
            from transformers import AutoTokenizer

            _LOADED[key] = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers and tokenizers raise anything from JSON, Rust and I/O errors
            raise InputError(f"{path}: the tokenizer could not be loaded ({_reason(e)})") from None
    return _LOADED[key]


def is_tokenizer(obj: Any) -> bool:
    """Duck typing for a ``transformers`` tokenizer: callable, with ``decode``."""
    return callable(obj) and callable(getattr(obj, "decode", None))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# ------------------------------------------------------------ text <-> ids

# Names the chat-template machinery gives a meaning of its own, beyond apply_chat_template's parameters (read
# from its signature by :func:`reserved_template_kwargs`): the variables transformers renders every template
# with, its special tokens (keyword arguments override them), its globals, and render_chat's own ``where``.
_MACHINERY_NAMES = frozenset({
    "conversation", "messages", "chat_template", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask",
    "tokenizer_kwargs", "padding", "truncation", "max_length", "raise_exception", "strftime_now", "where",
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
    "additional_special_tokens", "extra_special_tokens",
})


@functools.cache
def reserved_template_kwargs() -> frozenset[str]:
    """Keyword arguments a caller's ``chat_template_kwargs`` may not set.

    They are not template options but the machinery's own: the template itself (``chat_template``: a
    client's template would run its code), tools and documents, the messages, the generation prompt,
    tokenization and padding, special tokens, Jinja's globals (``range``, ``namespace``, ...). Read from
    the installed ``transformers`` and ``jinja2`` where they are, so new parameters are covered too.
    """
    import inspect

    names = set(_MACHINERY_NAMES)
    try:
        from transformers import PreTrainedTokenizerBase
        from transformers.utils import chat_template_utils

        for fn in (PreTrainedTokenizerBase.apply_chat_template, chat_template_utils.render_jinja_template):
            names |= {p.name for p in inspect.signature(fn).parameters.values()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
        names |= set(getattr(PreTrainedTokenizerBase, "SPECIAL_TOKENS_ATTRIBUTES", ()))
    except Exception:  # another transformers layout: the fixed names above still hold
        pass
    try:
        import jinja2

        names |= set(jinja2.Environment().globals)
    except Exception:
        pass
    return frozenset(names)


def check_template_kwargs(kwargs: Any) -> dict[str, Any]:
    """``kwargs`` for a chat template (e.g. ``{"enable_thinking": False}``) as a dict; an InputError for
    anything else, or for a name the template machinery reserves (:func:`reserved_template_kwargs`)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise InputError(f"chat_template_kwargs must be a dict of keyword arguments for the chat template "
                         f"(e.g. {{'enable_thinking': False}}), got {type(kwargs).__name__}")
    reserved = sorted(set(kwargs) & reserved_template_kwargs())
    if reserved:
        raise InputError(f"chat_template_kwargs can not set {', '.join(reserved)}: these belong to the chat "
                         "template machinery (the template, tools, messages, generation prompt, tokenization and "
                         "special tokens are set by eagle3-jax); pass only the template's own options, e.g. "
                         "{'enable_thinking': False}")
    return dict(kwargs)


def render_chat(tokenizer, messages: list[dict], *, where: str, **template_kwargs) -> str:
    """``messages`` rendered by the tokenizer's chat template, ready for a reply (``add_generation_prompt``).

    ``template_kwargs`` go to the template (e.g. ``enable_thinking=False`` for Qwen3).
    """
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    except Exception as e:  # a Jinja template can raise anything
        raise InputError(f"{where}: the tokenizer's chat template failed ({_reason(e)})") from None
    if not isinstance(text, str):
        raise InputError(f"{where}: the tokenizer's chat template returned {type(text).__name__}, not text")
    return text


def check_text(text: Any, *, where: str) -> str:
    """``text`` if it is a string of valid Unicode. A lone surrogate (a Python string, or JSON's ``"\\ud800"``,
    can hold one; UTF-8 can not) is an InputError naming the character and its position."""
    if not isinstance(text, str):
        raise InputError(f"{where} must be text (a string), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), "
                         "which is not valid Unicode text") from None
    return text


def token_ids(tokenizer, text: str, *, where: str) -> list[int]:
    """The token ids of ``text`` (no special tokens added)."""
    check_text(text, where=where)
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception as e:
        raise InputError(f"{where}: the tokenizer failed on it ({_reason(e)})") from None


def decode(tokenizer, ids: Sequence[int]) -> str:
    """The text of ``ids`` with special tokens (eos, chat markers) left out."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def check_messages(messages: Any, *, where: str) -> list[dict]:
    """A chat: a non-empty list of mappings, each with a string ``role`` (the template checks the rest)."""
    if not is_messages(messages):
        raise InputError(f"{where} must be a list of chat messages like [{{'role': 'user', 'content': '...'}}]")
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str):
            raise InputError(f"{where}, message {i}: needs a string 'role' (e.g. 'user'), got {m.get('role')!r}")
    return [dict(m) for m in messages]


def is_messages(value: Any) -> bool:
    """A non-empty sequence of mappings: one chat, as ``apply_chat_template`` takes it."""
    return (isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) > 0
            and all(isinstance(m, Mapping) for m in value))


# ------------------------------------------------------------------ thinking

def split_thinking(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a thinking model's reply: the text before and after ``</think>``, stripped.

    Without ``</think>`` the reasoning is "" and the whole text is the answer.
    """
    if THINK_END not in text:
        return "", text.strip()
    reasoning, answer = text.split(THINK_END, 1)
    return reasoning.replace(THINK_START, "").strip(), answer.strip()


def opens_thinking(prompt_text: str) -> bool:
    """Whether a prompt ends inside an open ``<think>`` block (Qwen3-Thinking-2507's template opens it),
    so that the reply starts with reasoning and holds only ``</think>``."""
    return prompt_text.rfind(THINK_START) > prompt_text.rfind(THINK_END)


def prompt_opens_thinking(tokenizer, prompt_ids: Sequence[int], tail: int = 16) -> bool:
    """:func:`opens_thinking` on the text of a prompt's last ``tail`` tokens (special tokens kept)."""
    try:
        return opens_thinking(tokenizer.decode(list(prompt_ids[-tail:]), skip_special_tokens=False))
    except Exception:  # a broken vocabulary: no thinking block then
        return False


def reasoning_and_answer(text: str, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning, answer) of a reply, both stripped.

    With ``</think>`` in ``text``: the text before it (``<think>`` removed)
    and after it. Without: (None, the whole text), or, when a thinking block
    was opened -- by the prompt (``opened``, as Qwen3-Thinking-2507's template
    does) or by the reply itself (hybrid Qwen3 models write ``<think>``) --
    (the whole text, ""): a reply cut before it finished thinking.
    """
    if THINK_END in text:
        return split_thinking(text)
    if opened or text.lstrip().startswith(THINK_START):
        return text.replace(THINK_START, "").strip(), ""
    return None, text.strip()


# ------------------------------------------------------------- stop strings

def check_stop_strings(stop: Any) -> tuple[str, ...]:
    """``stop`` (None, a string or a sequence of strings) as a tuple of non-empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, (bytes, Mapping)) or not isinstance(stop, Sequence):
        raise InputError(f"stop must be a string or a list of strings, got {type(stop).__name__} {stop!r:.60}")
    for s in stop:
        if not isinstance(s, str):
            raise InputError(f"stop must be a string or a list of strings, got an item {s!r:.60} "
                             f"({type(s).__name__})")
        if not s:
            raise InputError("stop strings must not be empty")
    return tuple(dict.fromkeys(stop))


def find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in ``text`` (the longest one on a tie), or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
            best = (i, s)
    return best


def cut_at_stop(text: str, stops: Sequence[str], include: bool = False) -> str | None:
    """``text`` cut before (``include``: after) its earliest stop string; None if it holds none."""
    hit = find_stop(text, stops)
    if hit is None:
        return None
    return text[: hit[0] + (len(hit[1]) if include else 0)]


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that begins a stop string (text to hold back when streaming)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def covering_prefix(decode_fn: Callable[[Sequence[int]], str], ids: Sequence[int], text: str) -> int:
    """The number of leading ``ids`` that cover ``text``: the smallest k with
    ``decode_fn(ids[:k]).startswith(text)``, found by bisection.

    ``decode_fn(ids)`` must start with ``text``. Decoding a longer prefix
    only appends text, so the search is exact; for a tokenizer where that
    fails, the k found still covers ``text``, it may just not be the smallest.
    """
    lo, hi = 0, len(ids)  # decode_fn(ids[:hi]) covers text
    while lo < hi:
        mid = (lo + hi) // 2
        if decode_fn(ids[:mid]).startswith(text):
            hi = mid
        else:
            lo = mid + 1
    return hi
