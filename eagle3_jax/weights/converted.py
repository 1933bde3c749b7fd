"""The converted checkpoint format: Flax parameters saved by orbax-checkpoint.

A converted directory holds the model's original ``config.json`` (and its
tokenizer and generation files) plus ``params/``, an orbax checkpoint of the
parameters already in Flax layout (kernels [in, out]), and ``eagle3_jax.json``
naming the format. It loads faster than safetensors: no renaming, no
transposes, and orbax restores straight into the requested dtype.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable

import jax
import numpy as np
from flax import nnx

from eagle3_jax.errors import CheckpointError
from eagle3_jax.weights.params import flat_params, with_values

MARKER = "eagle3_jax.json"
FORMAT = "eagle3-jax/orbax-params"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".py")
_NOT_COPIED = {"model.safetensors.index.json", MARKER}


def is_converted(model_dir: str) -> bool:
    return os.path.exists(os.path.join(model_dir, MARKER))


def read_marker(model_dir: str) -> dict:
    path = os.path.join(model_dir, MARKER)
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if marker.get("format") != FORMAT or marker.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported format {marker.get('format')!r} version {marker.get('version')!r} "
            f"(this eagle3-jax reads {FORMAT!r} version {FORMAT_VERSION}); re-run the conversion"
        )
    return marker


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def restore_into(abstract: nnx.Module, model_dir: str) -> nnx.Module:
    """Restores ``params/`` of a converted directory into a copy of ``abstract``.

    The saved tree must have exactly the expected parameter names and shapes;
    floating parameters are restored in the abstract module's dtype.
    """
    params_dir = os.path.abspath(os.path.join(model_dir, PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{model_dir}: converted checkpoint has no {PARAMS_DIR}/ directory")
    expected = flat_params(abstract)
    ckpt = _checkpointer()
    try:
        saved = ckpt.metadata(params_dir).item_metadata.tree
    except Exception as e:
        raise CheckpointError(f"{params_dir}: not a readable orbax checkpoint ({type(e).__name__}: {e})") from None
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong = [f"{k}: saved {list(saved[k].shape)}, expected {list(expected[k].shape)}"
             for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        lines = [f"{params_dir}: the converted parameters do not match the config"]
        if missing:
            lines.append(f"missing: {', '.join(missing[:12])}")
        if unexpected:
            lines.append(f"unexpected: {', '.join(unexpected[:12])}")
        lines.extend(wrong[:12])
        raise CheckpointError("\n  ".join(lines))
    target = {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for k, v in expected.items()}
    try:
        values = ckpt.restore(params_dir, target)
    except Exception as e:
        raise CheckpointError(f"{params_dir}: restoring failed ({type(e).__name__}: {e})") from None
    return with_values(abstract, values)


def save_converted(module: nnx.Module, src_dir: str, dst_dir: str, *, kind: str, extra: dict | None = None,
                   overwrite: bool = False, write_extra_files: Callable[[str], None] | None = None) -> str:
    """Writes ``module`` as a converted directory at ``dst_dir``, atomically.

    Everything is written into a temporary sibling directory that is renamed
    into place only when complete, so a failure leaves no partial output.
    Small metadata files (config, tokenizer) are copied from ``src_dir``.
    """
    dst_dir = os.path.abspath(dst_dir)
    if os.path.exists(dst_dir):
        if not overwrite:
            raise CheckpointError(f"{dst_dir}: already exists (pass --overwrite to replace it)")
        if not is_converted(dst_dir):
            raise CheckpointError(f"{dst_dir}: exists and is not a converted eagle3-jax checkpoint; refusing to replace it")
    parent = os.path.dirname(dst_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst_dir)}.partial-", dir=parent)
    try:
        for name in sorted(os.listdir(src_dir)):
            if name.endswith(_COPIED_SUFFIXES) and name not in _NOT_COPIED and os.path.isfile(os.path.join(src_dir, name)):
                shutil.copy2(os.path.join(src_dir, name), os.path.join(tmp, name))
        if write_extra_files is not None:
            write_extra_files(tmp)
        ckpt = _checkpointer()
        flat = {k: v[...] for k, v in flat_params(module).items()}
        ckpt.save(os.path.join(tmp, PARAMS_DIR), flat)
        ckpt.wait_until_finished()
        dtypes = sorted({str(np.dtype(v.dtype)) for v in flat.values()})
        marker = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "dtypes": dtypes, **(extra or {})}
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
        if os.path.exists(dst_dir):
            shutil.rmtree(dst_dir)
        os.rename(tmp, dst_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst_dir
