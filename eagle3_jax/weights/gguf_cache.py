"""GGUF files converted once: :func:`cached_conversion` turns a GGUF file into an HF directory in the user's
cache (``$EAGLE3_JAX_CACHE`` or ``~/.cache/eagle3-jax``, under ``gguf/``), keyed by the file's content;
``load_target("model.gguf")`` goes through it (the conversion is ``eagle3_jax/weights/gguf_io.py``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable

from eagle3_jax.errors import CheckpointError
from eagle3_jax.weights.gguf_io import convert_gguf, is_gguf_conversion


def cache_root() -> str:
    """Where eagle3-jax keeps converted files: ``$EAGLE3_JAX_CACHE``, else ``~/.cache/eagle3-jax``."""
    return os.environ.get("EAGLE3_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "eagle3-jax")


def file_key(path: str, chunk: int = 1 << 22) -> str:
    """A key for a file's content: its size and a hash of its first and last 4 MiB (the header and tensor index
    are at the start; a rewritten file changes its size or its ends)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


def cached_conversion(path: str | os.PathLike, *, cache_dir: str | None = None, progress: bool = True,
                      log: Callable[[str], None] | None = None) -> str:
    """The HF directory of a GGUF file, converted on first use into ``cache_dir`` (default :func:`cache_root`/gguf).

    Conversions are keyed by the file's content (:func:`file_key`), so a
    moved file is not converted again and a changed one is. Two processes
    converting at once both succeed (the directory appears atomically; the
    second finds it there).
    """
    path = os.fspath(path)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.splitext(os.path.basename(path))[0])[:80]
    root = cache_dir or os.path.join(cache_root(), "gguf")
    out = os.path.join(root, f"{stem}-{file_key(path)}")
    if is_gguf_conversion(out):
        return out
    if log is not None:
        log(f"converting {path} once into {out}")
    try:
        convert_gguf(path, out, progress=progress)
    except CheckpointError:
        if is_gguf_conversion(out):  # another process finished first
            return out
        raise
    return out

