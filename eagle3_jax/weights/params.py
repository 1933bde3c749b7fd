"""Filling an abstract NNX module with checkpoint tensors, and the reverse.

Loading runs in two passes. The first reads only the safetensors headers and
checks every tensor against the module's expected parameters (names, shapes,
dtypes), so a wrong or incomplete checkpoint fails in seconds with the full
list of problems. The second copies tensors shard by shard, casting and
transposing one tensor at a time, and places each on the device at once:
host memory peaks near one tensor, device memory at the model size. Each
floating tensor is checked for NaN and Inf as it passes through host memory
(a corrupt weight otherwise loads silently and generation emits garbage);
the check costs a fraction of the read and can be turned off.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from eagle3_jax.errors import CheckpointError
from eagle3_jax.weights.rules import RuleTable
from eagle3_jax.weights.safetensors_io import SafetensorsFile, save_file

_MAX_LISTED = 12
_FINITE_CHUNK = 1 << 22  # elements per finiteness pass: the temporary mask stays at a few MB
# dtypes whose NumPy isfinite is slow (ml_dtypes loops): test the exponent bits instead
_EXPONENT_BITS = {np.dtype(ml_dtypes.bfloat16): (np.dtype(np.uint16), 0x7F80)}


def count_nonfinite(array: np.ndarray) -> int:
    """The number of NaN and +-Inf values in a floating array (0 for other dtypes).

    Runs in chunks so no full-size temporary is allocated; bfloat16 is tested
    on its exponent bits (all ones means Inf or NaN), about 6x faster than
    ml_dtypes' isfinite.
    """
    if not jnp.issubdtype(array.dtype, jnp.floating) or array.size == 0:
        return 0
    flat = np.ascontiguousarray(array).reshape(-1)
    bits = _EXPONENT_BITS.get(flat.dtype)
    if bits is not None:
        flat = flat.view(bits[0])
    count = 0
    for start in range(0, flat.size, _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        bad = (chunk & bits[1]) == bits[1] if bits is not None else ~np.isfinite(chunk)
        if bad.any():
            count += int(np.count_nonzero(bad))
    return count


def nonfinite_message(source: str, name: str, count: int, array: np.ndarray, *, cast_from: np.dtype | None = None,
                      source_count: int | None = None) -> str:
    """The CheckpointError message for ``count`` non-finite values in tensor ``name`` of ``source``.

    When the tensor was cast from ``cast_from`` and held ``source_count == 0``
    non-finite values before the cast, the cast overflowed: say so instead of
    calling the checkpoint corrupt.
    """
    what = f"{source}: tensor {name!r} {list(array.shape)}"
    if cast_from is not None and source_count == 0:
        return (f"{what} overflows {array.dtype}: {count} of its {array.size} {np.dtype(cast_from)} values "
                f"become Inf when cast; load it in a wider dtype (e.g. float32 or bfloat16)")
    return (f"{what} holds {count} non-finite value(s) (NaN or Inf) of {array.size}: the checkpoint is corrupt "
            "(re-download or re-convert it), or load with check_finite=False to accept it anyway")


def flat_params(module_or_state) -> dict[str, nnx.Variable]:
    """Dotted parameter path -> Variable (abstract or concrete)."""
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state)
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def with_values(abstract: nnx.Module, values: Mapping[str, jax.Array]) -> nnx.Module:
    """A concrete copy of ``abstract`` whose parameters take ``values`` (dotted path -> array)."""
    graphdef, state = nnx.split(abstract)
    items = [(path, var.replace(values[".".join(str(p) for p in path)])) for path, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(items))


def _listing(title: str, names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" (and {len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return f"{title} ({len(names)}): {shown}{more}"


def _dtype_compatible(file_dtype: np.dtype, param_dtype) -> bool:
    param_dtype = np.dtype(param_dtype)
    if jnp.issubdtype(param_dtype, jnp.floating):
        return jnp.issubdtype(file_dtype, jnp.floating)
    return file_dtype == param_dtype


def load_safetensors_into(abstract: nnx.Module, files: Iterable[str], table: RuleTable, *,
                          source: str, progress: bool = True,
                          place: Callable[[str, np.ndarray], jax.Array] | None = None,
                          check_finite: bool = True,
                          ) -> nnx.Module:
    """Loads safetensors ``files`` into a copy of ``abstract`` (from ``nnx.eval_shape``).

    Floating tensors are cast to the dtype of the abstract parameter; integer
    and bool tensors must match exactly. Raises CheckpointError listing every
    missing, unexpected, duplicated or mis-shaped tensor before reading data.
    With ``check_finite`` (the default) a floating tensor holding NaN or Inf
    after the cast is a CheckpointError naming it and the count.
    ``place(path, array)`` puts each tensor on its device(s) as it is read
    (default: the default device; on a mesh, onto its shards).
    """
    if place is None:
        def place(path: str, array: np.ndarray) -> jax.Array:
            return jax.device_put(array)
    expected = flat_params(abstract)
    handles = [SafetensorsFile(f) for f in files]
    plan: list[tuple[SafetensorsFile, str, str]] = []
    owner: dict[str, str] = {}
    unexpected, problems = [], []
    for f in handles:
        for name in f.keys():
            mapped = table.param_path(name)
            if mapped is None or mapped[0] not in expected:
                if not table.ignored(name):
                    unexpected.append(name)
                continue
            path, rule = mapped
            if path in owner:
                problems.append(f"tensor {name!r} appears twice ({os.path.basename(owner[path])} and "
                                f"{os.path.basename(f.path)})")
                continue
            owner[path] = f.path
            var = expected[path]
            shape = f.shape(name)
            as_param = shape[::-1] if rule.transpose else shape
            if tuple(as_param) != tuple(var.shape):
                want = tuple(var.shape)[::-1] if rule.transpose else tuple(var.shape)
                problems.append(f"tensor {name!r} has shape {list(shape)} but the config expects {list(want)}")
            elif rule.file_dtype is not None and f.dtype(name) != np.dtype(rule.file_dtype):
                problems.append(f"tensor {name!r} has dtype {f.dtype(name)} but {rule.file_dtype} is expected")
            elif rule.file_dtype is None and not _dtype_compatible(f.dtype(name), var.dtype):
                problems.append(f"tensor {name!r} has dtype {f.dtype(name)} but {np.dtype(var.dtype)} is expected")
            else:
                plan.append((f, name, path))
    missing = sorted(p for p in expected if p not in owner)
    missing_names, defaulted = [], []
    for p in missing:
        mapped = table.checkpoint_name(p)
        if mapped is not None and mapped[1].default is not None:
            defaulted.append((p, mapped[1]))
        else:
            missing_names.append(mapped[0] if mapped else p)
    if unexpected or missing_names or problems:
        parts = [f"{source}: the checkpoint does not match its config"]
        if missing_names:
            parts.append(_listing("missing tensors", missing_names))
        if unexpected:
            parts.append(_listing("unexpected tensors", sorted(unexpected)))
        parts.extend(problems[:_MAX_LISTED])
        raise CheckpointError("\n  ".join(parts))

    values: dict[str, jax.Array] = {}
    for path, rule in defaulted:  # tensors a format may omit (a full-vocabulary head's d2t / t2d)
        var = expected[path]
        values[path] = place(path, rule.default(tuple(var.shape), np.dtype(var.dtype)))
    for f, name, path in tqdm(plan, desc=f"loading {os.path.basename(os.path.normpath(source))}",
                              unit="tensor", disable=not progress, leave=False):
        _, rule = table.param_path(name)
        want = np.dtype(expected[path].dtype)
        if jnp.issubdtype(want, jnp.integer):  # e.g. int64 d2t into int32: check the range first
            array = f.read(name)
            if array.size and (array.min() < np.iinfo(want).min or array.max() > np.iinfo(want).max):
                raise CheckpointError(f"{source}: tensor {name!r} has values outside the range of {want}")
            array = array.astype(want)
        else:
            array = f.read(name, dtype=want)
            if check_finite:
                _check_finite(source, f, name, array)
        values[path] = place(path, rule.to_param(array))
    return with_values(abstract, values)


def _check_finite(source: str, f: SafetensorsFile, name: str, array: np.ndarray) -> None:
    """Raises CheckpointError if ``array`` (tensor ``name`` of ``f``, maybe cast) holds NaN or Inf."""
    count = count_nonfinite(array)
    if count:
        cast_from = f.dtype(name) if f.dtype(name) != array.dtype else None
        source_count = count_nonfinite(f.read(name)) if cast_from is not None else None
        raise CheckpointError(nonfinite_message(f"{source} ({os.path.basename(f.path)})", name, count, array,
                                                cast_from=cast_from, source_count=source_count))


def export_safetensors(module: nnx.Module, table: RuleTable, path: str, *, dtype=None,
                       metadata: Mapping[str, str] | None = None,
                       extra: Mapping[str, np.ndarray] | None = None) -> None:
    """Writes the module's parameters under their checkpoint names (inverse of loading).

    ``dtype`` casts floating parameters (e.g. to bfloat16 for published heads);
    ``extra`` adds tensors that are not parameters of the module.
    """
    tensors = dict(extra or {})
    for p, var in flat_params(module).items():
        mapped = table.checkpoint_name(p)
        if mapped is None:
            raise CheckpointError(f"parameter {p!r} has no checkpoint name in the rule table")
        name, rule = mapped
        array = np.asarray(jax.device_get(var[...]))
        if dtype is not None and jnp.issubdtype(array.dtype, jnp.floating):
            array = array.astype(dtype)
        tensors[name] = rule.to_checkpoint(array)
    save_file(tensors, path, metadata=metadata or {"format": "pt"})
