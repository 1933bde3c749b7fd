"""Small helpers for the Colab notebooks in ``notebooks/`` (kept here so the
notebooks stay short and the helpers are tested with the package)."""

from __future__ import annotations

import os
import socket

import jax

from eagle3_jax.demo import demo_paths


def accelerator() -> str:
    """A one-line description of the devices JAX runs on."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"{jax.default_backend()}: {len(devices)} x {', '.join(kinds)}"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers (False when offline or HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def pick_models(target: str, draft: str, use_demo: str | bool = "auto") -> tuple[str, str, bool]:
    """(target, draft, is_demo): the Hub models, or the embedded demo pair.

    ``use_demo`` is True/"1" (always the demo pair), False/"0" (always the
    Hub ids) or "auto" (the demo pair when the Hub can not be reached).
    """
    choice = str(use_demo).lower()
    demo = choice in ("1", "true", "yes") or (choice == "auto" and not hub_reachable())
    if demo:
        t, d = demo_paths()
        return t, d, True
    return target, draft, False


def split_thinking(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a thinking model's reply: the text before and after ``</think>``."""
    if "</think>" not in text:
        return "", text.strip()
    reasoning, answer = text.split("</think>", 1)
    return reasoning.replace("<think>", "").strip(), answer.strip()
