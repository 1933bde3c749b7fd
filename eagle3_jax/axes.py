"""The axis vocabulary: logical axes, the mesh axes they map to, and constraints by them
(docs/architecture.md#device-mesh).

A mesh has two axes, ``data`` (batch rows) and ``tensor`` (heads, MLP
columns, vocabulary). Each array names its dimensions with *logical* axes
where it is defined -- a parameter in its module (``Param`` metadata
``logical_axes``), a loop-state field in its dataclass (:func:`axes_field`),
the KV cache in ``KVCache.axes`` -- and one table maps a logical axis to a
mesh axis:

    batch     -> data      the rows of a generation or a training batch
    heads     -> tensor    query heads (q_proj's columns, o_proj's rows)
    kv_heads  -> tensor    key/value heads (k_proj, v_proj, the KV cache)
    mlp       -> tensor    the MLP's intermediate columns
    vocab     -> tensor    the embedding's rows, lm_head's columns
    embed     -> (whole)   the residual stream

Outside a mesh (``current_mesh()`` is None) every helper here is a no-op, so
single-device code is unchanged. This module imports nothing of the project;
placing arrays on a mesh (plans, ``put``) is ``eagle3_jax/sharding.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec

DATA, TENSOR = "data", "tensor"
MESH_AXES = (DATA, TENSOR)

LogicalAxes = tuple[str | None, ...]

# logical axis -> mesh axis (None: never sharded)
LOGICAL_TO_MESH: dict[str, str | None] = {
    "batch": DATA,
    "heads": TENSOR,
    "kv_heads": TENSOR,
    "mlp": TENSOR,
    "vocab": TENSOR,
    "embed": None,
}

# The KV cache's buffers [batch, kv_heads, capacity, head_dim]; the draft head's cache keeps its heads whole.
KV_CACHE_AXES: LogicalAxes = ("batch", "kv_heads", None, None)
DRAFT_KV_CACHE_AXES: LogicalAxes = ("batch", None, None, None)
# The metadata key under which a parameter (nnx.Param) or a dataclass field declares its logical axes.
AXES_KEY = "logical_axes"


def param_metadata(axes: LogicalAxes) -> dict[str, LogicalAxes]:
    """Metadata declaring a parameter's logical axes: ``nnx.Param(x, **param_metadata(axes))``, or
    ``nnx.Linear(..., kernel_metadata=param_metadata(axes))``."""
    return {AXES_KEY: tuple(axes)}


def axes_field(axes: LogicalAxes, **kwargs) -> Any:
    """A dataclass field holding an array with these logical axes (its leading dimensions; the
    dimensions past them are whole). :func:`constrain_tree` lays the field out by them."""
    return dataclasses.field(metadata={AXES_KEY: tuple(axes)}, **kwargs)


ROWS: LogicalAxes = ("batch",)  # an array of one entry (or one vector) per row
SHARED: LogicalAxes = ()  # an array every device holds whole (a scalar counter)


def current_mesh():
    """The mesh set with ``jax.set_mesh`` (an AbstractMesh while tracing), or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def logical_spec(shape: Sequence[int], axes: LogicalAxes, mesh_sizes: Mapping[str, int],
                 replicated: frozenset[str] = frozenset()) -> PartitionSpec:
    """The PartitionSpec of an array of ``shape`` with logical ``axes``: each logical axis on its mesh
    axis (:data:`LOGICAL_TO_MESH`) unless the mesh axis is absent, of size 1, does not divide the
    dimension, or the logical axis is in ``replicated``."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match an array of shape {tuple(shape)}")
    parts = []
    for dim, name in zip(shape, axes):
        target = LOGICAL_TO_MESH.get(name) if name is not None else None
        size = mesh_sizes.get(target, 1) if target is not None else 1
        keep = target is not None and name not in replicated and size > 1 and dim % size == 0
        parts.append(target if keep else None)
    return PartitionSpec(*parts)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """``x`` constrained to its logical axes on the current mesh (a no-op outside one).

    For the places where XLA's propagation would otherwise guess: new cache
    buffers, the compacted tree path, the concatenated features.
    """
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(x.shape, axes, dict(mesh.shape)))


def constrain_tree(tree: Any) -> Any:
    """Every array of a loop state laid out by its declared axes (a no-op outside a mesh).

    Walks dataclasses: a field declared with :func:`axes_field` is constrained
    to its axes; a dataclass with a ``constrain_layout()`` method (the KV
    cache, whose axes are its own) lays itself out; other dataclass fields,
    tuples and lists are walked. An array field that declares no axes is an
    error (a layout is never guessed from a shape). Applied to what each
    compiled program returns, so that the prefill's state, a loop chunk's and
    the next chunk's input have the same shardings (another layout would be
    another program).
    """
    if current_mesh() is None:
        return tree
    return _constrain_node(tree, "state")


def _constrain_node(x: Any, where: str) -> Any:
    if hasattr(x, "constrain_layout"):
        return x.constrain_layout()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        changes = {}
        for f in dataclasses.fields(x):
            value = getattr(x, f.name)
            if f.metadata.get("static") or value is None:
                continue
            axes = f.metadata.get(AXES_KEY)
            if axes is not None:
                changes[f.name] = constrain(value, tuple(axes) + (None,) * (value.ndim - len(axes)))
            elif isinstance(value, jax.Array):
                raise TypeError(f"{type(x).__name__}.{f.name} declares no logical axes (axes_field)")
            else:
                changes[f.name] = _constrain_node(value, f"{type(x).__name__}.{f.name}")
        return dataclasses.replace(x, **changes)
    if isinstance(x, (tuple, list)):
        return type(x)(_constrain_node(v, where) for v in x)
    if isinstance(x, jax.Array):
        raise TypeError(f"{where}: an array outside a dataclass field declares no logical axes")
    return x
