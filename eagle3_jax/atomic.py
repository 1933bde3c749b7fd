"""Writing an output directory all at once, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator

from eagle3_jax.errors import CheckpointError


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False,
                     replaceable: Callable[[str], bool] = lambda path: False) -> Iterator[str]:
    """Yields a temporary sibling directory that becomes ``dst`` when the block succeeds.

    On any error the temporary directory is removed and ``dst`` is untouched.
    An existing ``dst`` is replaced only with ``overwrite=True`` and only when
    ``replaceable(dst)`` says it is ours to replace (never an arbitrary directory).
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst):
        if not overwrite:
            raise CheckpointError(f"{dst}: already exists (pass --overwrite to replace it)")
        if not replaceable(dst):
            raise CheckpointError(f"{dst}: exists and is not an output of eagle3-jax; refusing to replace it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
    try:
        yield tmp
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
