"""Text through a model's tokenizer, with the project's own errors.

A chat template is Jinja code shipped with a checkpoint and a tokenizer is a
Rust library: either can raise anything on input it dislikes. These helpers
turn that into an :class:`~eagle3_jax.errors.InputError` that says where it
happened, for the CLI, evaluation and regeneration alike.
"""

from __future__ import annotations

from eagle3_jax.errors import InputError


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip()[:200]}"


def render_chat(tokenizer, messages: list[dict], *, where: str) -> str:
    """``messages`` rendered by the tokenizer's chat template, ready for a reply (``add_generation_prompt``)."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a Jinja template can raise anything
        raise InputError(f"{where}: the tokenizer's chat template failed ({_reason(e)})") from None
    if not isinstance(text, str):
        raise InputError(f"{where}: the tokenizer's chat template returned {type(text).__name__}, not text")
    return text


def token_ids(tokenizer, text: str, *, where: str) -> list[int]:
    """The token ids of ``text`` (no special tokens added)."""
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception as e:
        raise InputError(f"{where}: the tokenizer failed on it ({_reason(e)})") from None
