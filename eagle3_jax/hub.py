"""Resolving a model argument to a local directory (fetching Hub ids on demand)."""

from __future__ import annotations

import os
import re
import sys

from eagle3_jax.errors import CheckpointError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# What a model directory needs; never the pickled *.bin / *.pt files of a target.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*")
# A draft head may be the EAGLE authors' pytorch_model.bin (read with PyTorch's restricted
# unpickler, eagle3_jax/weights/torch_bin.py); nothing else pickled is fetched.
DRAFT_HUB_PATTERNS = (*HUB_PATTERNS, "pytorch_model.bin")


def resolve_model_dir(name_or_path: str | os.PathLike, *, draft: bool = False) -> str:
    """A local directory for ``name_or_path``.

    A path to an existing directory is returned as is. A GGUF file (a target)
    is converted once into the user's cache and that directory returned
    (:func:`eagle3_jax.weights.gguf_cache.cached_conversion`). Anything else that
    looks like a Hub id (``org/name``) is downloaded with ``huggingface_hub``
    (safetensors and JSON files only, plus ``pytorch_model.bin`` for a
    ``draft`` head); offline, that fails with a clear error.
    """
    if isinstance(name_or_path, bytes) or not isinstance(name_or_path, (str, os.PathLike)):
        raise CheckpointError(f"a model must be named by a path or a Hub id (str or os.PathLike), got "
                              f"{type(name_or_path).__name__} {name_or_path!r:.60}")
    path = os.path.expanduser(os.fspath(name_or_path))
    if not isinstance(path, str) or not path:
        raise CheckpointError(f"a model must be named by a non-empty path or Hub id, got {name_or_path!r:.60}")
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        from eagle3_jax.weights import gguf_cache, gguf_io

        if gguf_io.is_gguf_file(path):
            if draft:
                raise CheckpointError(f"{path}: a GGUF file; EAGLE-3 draft heads are read from HF directories only")
            return gguf_cache.cached_conversion(path, log=lambda line: print(line, file=sys.stderr, flush=True))
        raise CheckpointError(f"{path}: expected a model directory (or a GGUF file), found a file")
    if os.path.islink(path):
        raise CheckpointError(f"{path}: a symbolic link that leads nowhere (its target is missing, or it loops)")
    if not _REPO_ID.match(path) or path.startswith((".", "/", "~")):
        raise CheckpointError(f"{path}: no such directory (and not a Hugging Face Hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=path, allow_patterns=list(DRAFT_HUB_PATTERNS if draft else HUB_PATTERNS))
    except Exception as e:  # network errors, missing repos, offline mode: all reported the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a local directory, and downloading it from the Hugging Face Hub failed ({reason}). "
            "Check the id and your network (HF_HUB_OFFLINE=1 forbids downloads), or pass a local directory."
        ) from None
