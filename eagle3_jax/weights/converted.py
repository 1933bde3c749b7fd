"""The converted checkpoint format: Flax parameters saved by orbax-checkpoint.

A converted directory holds the model's original ``config.json`` (and its
tokenizer and generation files) plus ``params/``, an orbax checkpoint of the
parameters already in Flax layout (kernels [in, out]), and ``eagle3_jax.json``
naming the format. It loads faster than safetensors: no renaming, no
transposes, and orbax restores straight into the requested dtype.

A broken directory (a marker that is not a JSON object, missing, truncated
or garbled files under ``params/``, a FIFO where a file should be) is a
CheckpointError naming the directory; restored floating parameters are
checked for NaN and Inf unless that is turned off.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eagle3_jax.atomic import atomic_directory
from eagle3_jax.errors import CheckpointError
from eagle3_jax.sharding import put, to_host
from eagle3_jax.weights.params import count_nonfinite, flat_params, nonfinite_message, with_values
from eagle3_jax.weights.safetensors_io import describe_json, read_json_file

MARKER = "eagle3_jax.json"
FORMAT = "eagle3-jax/orbax-params"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".py")
_NOT_COPIED = {"model.safetensors.index.json", MARKER}


def is_converted(model_dir: str) -> bool:
    return os.path.exists(os.path.join(model_dir, MARKER))


def read_marker(model_dir: str) -> dict:
    """The marker of a converted directory, checked to be a JSON object of a format this version reads."""
    path = os.path.join(model_dir, MARKER)
    marker = read_json_file(path, "converted-checkpoint marker")
    if not isinstance(marker, dict):
        raise CheckpointError(f"{path}: not a converted-checkpoint marker (expected a JSON object with "
                              f"'format' and 'version', found {describe_json(marker)}); re-run the conversion")
    version = marker.get("version")
    if marker.get("format") != FORMAT or type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported format {marker.get('format')!r} version {marker.get('version')!r} "
            f"(this eagle3-jax reads {FORMAT!r} version {FORMAT_VERSION}); re-run the conversion"
        )
    return marker


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _check_tree_files(model_dir: str, params_dir: str) -> None:
    """Refuses a ``params/`` holding anything but directories and regular files.

    orbax (tensorstore) would open a FIFO and block forever, or read a device.
    Symlinks are followed, as in a Hub cache snapshot.
    """
    for root, dirs, files in os.walk(params_dir):
        for name in files + dirs:
            path = os.path.join(root, name)
            try:
                mode = os.stat(path).st_mode
            except OSError as e:
                raise CheckpointError(f"{model_dir}: broken converted checkpoint: {path}: {e.strerror or e}") from None
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise CheckpointError(f"{model_dir}: broken converted checkpoint: {path} is not a regular file")


def _saved_shapes(model_dir: str, params_dir: str, ckpt) -> dict[str, tuple[int, ...]]:
    """Parameter path -> shape, from the orbax metadata of ``params_dir``."""
    try:
        item = ckpt.metadata(params_dir).item_metadata
        tree = item.tree if item is not None else None
    except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, JSONDecodeError, ...)
        raise CheckpointError(f"{model_dir}: broken converted checkpoint: {params_dir} is not a readable "
                              f"orbax checkpoint ({type(e).__name__}: {e}); re-run the conversion") from None
    if tree is None:
        raise CheckpointError(f"{model_dir}: broken converted checkpoint: the metadata of {params_dir} is missing "
                              "or unreadable; re-run the conversion")
    if not isinstance(tree, dict) or not all(isinstance(k, str) for k in tree):
        raise CheckpointError(f"{model_dir}: broken converted checkpoint: {params_dir} does not hold a flat "
                              "mapping of parameter names to arrays; re-run the conversion")
    shapes = {}
    for k, v in tree.items():
        shape = getattr(v, "shape", None)
        if not isinstance(shape, tuple) or not all(isinstance(d, int) for d in shape):
            raise CheckpointError(f"{model_dir}: broken converted checkpoint: entry {k!r} of {params_dir} "
                                  "is not an array; re-run the conversion")
        shapes[k] = shape
    return shapes


def _restore(ckpt, params_dir: str, target: dict) -> tuple[object, str | None]:
    """orbax's restore, and a description of its failure (None when it worked).

    The error is described and dropped here rather than chained: its
    traceback holds orbax's pending read coroutines, which would otherwise
    live as long as the CheckpointError and complain when collected later.
    """
    try:
        return ckpt.restore(params_dir, target), None
    except Exception as e:  # tensorstore and orbax errors have no common base class
        return None, _root_cause(e)


def _root_cause(error: BaseException) -> str:
    """The innermost cause of ``error``, on one short line (orbax wraps tensorstore's specific message)."""
    for _ in range(8):
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:300]}"


def _as_device_arrays(values, target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array] | None:
    """``values`` as device arrays of the target's shapes and dtypes, or None if the tree differs.

    orbax hands back NumPy arrays when the checkpoint's ``_sharding`` file is
    gone; the values are right, so they are placed on the default device.
    """
    if not isinstance(values, dict) or set(values) != set(target):
        return None
    out = {}
    for k, want in target.items():
        v = values[k]
        if tuple(getattr(v, "shape", ())) != want.shape:
            return None
        placed = want.sharding is None or getattr(v, "sharding", None) == want.sharding
        if isinstance(v, jax.Array) and v.dtype == want.dtype and placed:
            out[k] = v
        elif want.sharding is not None:
            out[k] = put(np.asarray(v, want.dtype), want.sharding)
        else:
            out[k] = jax.device_put(np.asarray(v, want.dtype))
    return out


@jax.jit
def _all_finite(array: jax.Array) -> jax.Array:
    """Whether every value of ``array`` is finite (compiled once per shape and dtype)."""
    return jnp.all(jnp.isfinite(array))


def _on_host(array: jax.Array) -> bool:
    return array.is_fully_addressable and all(d.platform == "cpu" for d in array.devices())


def check_finite_arrays(arrays: dict[str, jax.Array], source: str) -> None:
    """Raises CheckpointError naming the first floating array that holds NaN or Inf, with the count.

    Arrays in host memory are checked with NumPy on a zero-copy view (XLA's
    CPU reduction is several times slower); arrays on an accelerator with a
    compiled reduction there, all dispatched before one transfer of the flags.
    """
    floating = sorted(k for k, v in arrays.items() if jnp.issubdtype(v.dtype, jnp.floating))
    on_device = [k for k in floating if not _on_host(arrays[k])]
    flags = dict(zip(on_device, jax.device_get([_all_finite(arrays[k]) for k in on_device])))
    for k in floating:
        if k in flags and flags[k]:
            continue
        array = np.asarray(to_host(arrays[k]))
        count = count_nonfinite(array)
        if count:
            raise CheckpointError(nonfinite_message(source, k, count, array))


def restore_into(abstract: nnx.Module, model_dir: str, *, check_finite: bool = True,
                 sharding_of: Callable[[str, tuple[int, ...]], Any] | None = None) -> nnx.Module:
    """Restores ``params/`` of a converted directory into a copy of ``abstract``.

    The saved tree must have exactly the expected parameter names and shapes;
    floating parameters are restored in the abstract module's dtype. With
    ``check_finite`` (the default) a floating parameter holding NaN or Inf is
    a CheckpointError naming it and the count. Any broken file under
    ``params/`` is a CheckpointError naming the directory.
    ``sharding_of(path, shape)`` gives each parameter's sharding on a device
    mesh: orbax reads every shard straight onto its device.
    """
    params_dir = os.path.abspath(os.path.join(model_dir, PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{model_dir}: converted checkpoint has no {PARAMS_DIR}/ directory")
    _check_tree_files(model_dir, params_dir)
    expected = flat_params(abstract)
    ckpt = _checkpointer()
    saved = _saved_shapes(model_dir, params_dir, ckpt)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong = [f"{k}: saved {list(saved[k])}, expected {list(expected[k].shape)}"
             for k in expected if k in saved and tuple(saved[k]) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        lines = [f"{params_dir}: the converted parameters do not match the config"]
        if missing:
            lines.append(f"missing: {', '.join(missing[:12])}")
        if unexpected:
            lines.append(f"unexpected: {', '.join(unexpected[:12])}")
        lines.extend(wrong[:12])
        raise CheckpointError("\n  ".join(lines))
    target = {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype,
                                      sharding=sharding_of(k, tuple(v.shape)) if sharding_of else None)
              for k, v in expected.items()}
    values, failure = _restore(ckpt, params_dir, target)
    if failure is not None:
        raise CheckpointError(f"{model_dir}: broken converted checkpoint: restoring {params_dir} failed "
                              f"({failure}); re-run the conversion")
    values = _as_device_arrays(values, target)
    if values is None:
        raise CheckpointError(f"{model_dir}: broken converted checkpoint: {params_dir} restored to a different "
                              "tree than its metadata describes; re-run the conversion")
    if check_finite:
        check_finite_arrays(values, f"{model_dir} ({PARAMS_DIR}/)")
    return with_values(abstract, values)


def save_converted(module: nnx.Module, src_dir: str, dst_dir: str, *, kind: str, extra: dict | None = None,
                   overwrite: bool = False) -> str:
    """Writes ``module`` as a converted directory at ``dst_dir``, atomically.

    Small metadata files (config, tokenizer) are copied from ``src_dir``; an
    existing ``dst_dir`` is replaced only if it is itself a converted directory.
    """
    dst_dir = os.path.abspath(dst_dir)
    with atomic_directory(dst_dir, overwrite=overwrite, replaceable=is_converted,
                          what="converted checkpoint") as tmp:
        for name in sorted(os.listdir(src_dir)):
            copied = name.endswith(_COPIED_SUFFIXES) and name not in _NOT_COPIED
            if copied and os.path.isfile(os.path.join(src_dir, name)):
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
