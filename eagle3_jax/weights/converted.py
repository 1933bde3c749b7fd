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

import jax
import numpy as np
from flax import nnx

from eagle3_jax.atomic import atomic_directory
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
                   overwrite: bool = False) -> str:
    """Writes ``module`` as a converted directory at ``dst_dir``, atomically.

    Small metadata files (config, tokenizer) are copied from ``src_dir``; an
    existing ``dst_dir`` is replaced only if it is itself a converted directory.
    """
    dst_dir = os.path.abspath(dst_dir)
    with atomic_directory(dst_dir, overwrite=overwrite, replaceable=is_converted) as tmp:
        for name in sorted(os.listdir(src_dir)):
            if name.endswith(_COPIED_SUFFIXES) and name not in _NOT_COPIED and os.path.isfile(os.path.join(src_dir, name)):
                shutil.copy2(os.path.join(src_dir, name), os.path.join(tmp, name))
        ckpt = _checkpointer()
        flat = {k: v[...] for k, v in flat_params(module).items()}
        ckpt.save(os.path.join(tmp, PARAMS_DIR), flat)
        ckpt.wait_until_finished()
        dtypes = sorted({str(np.dtype(v.dtype)) for v in flat.values()})
        marker = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "dtypes": dtypes, **(extra or {})}
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
    return dst_dir
