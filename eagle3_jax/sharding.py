"""Placement on a device mesh: meshes, sharding plans, and putting arrays on their shards
(docs/architecture.md#device-mesh).

The vocabulary -- logical axes and the mesh axes they map to -- is
``eagle3_jax/axes.py``; the arrays declare theirs where they are defined (a
target's parameters in its modules, the KV cache in ``KVCache.axes``). That
is Megatron-style tensor parallelism: each device holds 1/N of the heads and
MLP columns and of the KV cache, and XLA's SPMD partitioner (GSPMD) inserts
the all-reduces after ``o_proj`` and ``down_proj``. Attention runs per shard
(``eagle3_jax/attention/sharded.py``): every (row, KV head) is independent,
so it needs no communication. The draft head and the tree bookkeeping are
small and replicated.

A dimension that the mesh axis does not divide is kept whole (replicated) on
that axis -- :class:`ShardingPlan` says which, and refuses query heads that
do not divide (tensor parallelism over heads is the point of the axis).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eagle3_jax.axes import AXES_KEY, DATA, MESH_AXES, TENSOR, LogicalAxes, logical_spec
from eagle3_jax.errors import InputError
from eagle3_jax.weights.params import flat_params, with_values


def param_axes(module: Any) -> dict[str, LogicalAxes]:
    """Dotted parameter path -> the logical axes its module declared (``Param`` metadata).

    Raises:
      ValueError: a parameter declares no axes, or axes that do not match its rank.
    """
    out = {}
    for path, var in flat_params(module).items():
        axes = var.get_metadata().get(AXES_KEY)
        if axes is None or len(axes) != len(var.shape):
            raise ValueError(f"parameter {path!r} of shape {tuple(var.shape)} declares logical axes {axes} "
                             "(its module must declare one per dimension)")
        out[path] = tuple(axes)
    return out


# ------------------------------------------------------------------ meshes

def make_mesh(tensor_parallel: int = 1, data_parallel: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, tensor)`` mesh over the first ``data_parallel * tensor_parallel`` devices.

    ``devices`` defaults to ``jax.devices()`` (every process's devices after
    ``jax.distributed.initialize()``). Neighbouring devices share a tensor
    group, so its all-reduces take the fastest links.
    """
    for name, n in (("tensor_parallel", tensor_parallel), ("data_parallel", data_parallel)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"{name} must be a positive integer, got {n!r}")
    available = list(jax.devices() if devices is None else devices)
    wanted = int(tensor_parallel) * int(data_parallel)
    if wanted > len(available):
        raise InputError(f"a mesh of {data_parallel} x {tensor_parallel} (data x tensor) needs {wanted} devices, but "
                         f"{len(available)} are available ({available[0].platform}); on a CPU, "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={wanted} simulates more")
    grid = np.array(available[:wanted], dtype=object).reshape(int(data_parallel), int(tensor_parallel))
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def mesh_shape(mesh: Mesh | None) -> tuple[int, int]:
    """(data_parallel, tensor_parallel) of a mesh; (1, 1) for None."""
    if mesh is None:
        return 1, 1
    return int(mesh.shape.get(DATA, 1)), int(mesh.shape.get(TENSOR, 1))


def check_mesh(mesh: Any) -> Mesh | None:
    """``mesh`` if it is None or a Mesh with the axes ``data`` and ``tensor``, else an InputError.

    A mesh of one ``data`` axis (what training took before tensor parallelism) is the same
    devices with a tensor axis of 1.
    """
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise InputError(f"mesh must be a jax.sharding.Mesh (see eagle3_jax.sharding.make_mesh), "
                         f"got {type(mesh).__name__}")
    if tuple(mesh.axis_names) == (DATA,):
        return Mesh(mesh.devices.reshape(-1, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    if tuple(mesh.axis_names) != MESH_AXES:
        raise InputError(f"mesh axes must be {MESH_AXES} (see eagle3_jax.sharding.make_mesh), "
                         f"got {tuple(mesh.axis_names)}")
    return mesh


# ------------------------------------------------------------------ plans

@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Where a target's parameters, its KV cache and a batch go on a mesh.

    Build it with :meth:`for_target`. Attributes:
      mesh: the ``(data, tensor)`` mesh.
      replicated: logical axes kept whole because the tensor axis does not
        divide them (e.g. ``kv_heads`` for 8 KV heads on 16 devices).
      notes: one line per replicated axis, saying what it costs.
    """

    mesh: Mesh
    replicated: frozenset[str] = frozenset()
    notes: tuple[str, ...] = ()

    @classmethod
    def for_target(cls, mesh: Mesh, config: Any) -> ShardingPlan:
        """The plan of a target config on ``mesh``.

        Raises InputError when the tensor axis does not divide the query
        heads; KV heads, MLP columns or a vocabulary it does not divide are
        replicated on it (noted in :attr:`notes`).
        """
        mesh = check_mesh(mesh)
        _, tp = mesh_shape(mesh)
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        if heads % tp:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            raise InputError(f"tensor parallel {tp} (the mesh's tensor axis, --tensor-parallel) does not divide "
                             f"the model's {heads} attention heads; choose one of {', '.join(map(str, divisors))}")
        replicated, notes = set(), []
        sizes = {"kv_heads": (kv, "KV heads"), "mlp": (config.intermediate_size, "MLP columns"),
                 "vocab": (config.vocab_size, "vocabulary entries")}
        for axis, (n, what) in sizes.items():
            if n % tp:
                replicated.add(axis)
                extra = " and the KV cache (each device holds all of it)" if axis == "kv_heads" else ""
                notes.append(f"tensor parallel {tp} does not divide the model's {n} {what}: their weights{extra} "
                             "are replicated on every device of a tensor group")
        return cls(mesh=mesh, replicated=frozenset(replicated), notes=tuple(notes))

    @property
    def data_parallel(self) -> int:
        return mesh_shape(self.mesh)[0]

    @property
    def tensor_parallel(self) -> int:
        return mesh_shape(self.mesh)[1]

    @property
    def shards_kv_heads(self) -> bool:
        return self.tensor_parallel > 1 and "kv_heads" not in self.replicated

    def spec(self, shape: Sequence[int], axes: LogicalAxes) -> PartitionSpec:
        return logical_spec(shape, axes, dict(self.mesh.shape), self.replicated)

    def sharding(self, shape: Sequence[int], axes: LogicalAxes) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(shape, axes))

    @property
    def replicate(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def param_shardings(self, module: Any) -> dict[str, NamedSharding]:
        """Dotted path -> sharding of every parameter of a target module (abstract or concrete), by the
        logical axes its modules declare (:func:`param_axes`)."""
        variables = flat_params(module)
        return {path: self.sharding(variables[path].shape, axes) for path, axes in param_axes(module).items()}

    def describe(self) -> str:
        """One line: 'mesh data 2 x tensor 4 (8 devices)', plus what is replicated."""
        dp, tp = self.data_parallel, self.tensor_parallel
        text = f"mesh data {dp} x tensor {tp} ({dp * tp} devices)"
        if self.replicated:
            text += f"; replicated on the tensor axis: {', '.join(sorted(self.replicated))}"
        return text


# ------------------------------------------------------------------ placing arrays

def put(array: Any, sharding: NamedSharding) -> jax.Array:
    """A host array placed on ``sharding``, each device receiving only its own slice.

    Works across processes (every process passes the same array); nothing
    whole is put on one device first.
    """
    if isinstance(array, jax.Array) and not isinstance(array, np.ndarray):
        if array.sharding == sharding:
            return array
        if array.is_fully_addressable and sharding.is_fully_addressable:
            return jax.device_put(array, sharding)
        array = np.asarray(array)
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_tree(tree: Any, sharding: NamedSharding) -> Any:
    """Every array leaf of ``tree`` placed on ``sharding`` (typed PRNG keys included)."""

    def place(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        return put(x, sharding)

    return jax.tree.map(place, tree)


def place_target(module: Any, plan: ShardingPlan) -> Any:
    """A target module with every parameter placed on its shards (:meth:`ShardingPlan.param_shardings`)."""
    shardings = plan.param_shardings(module)
    return with_values(module, {path: put(var[...], shardings[path]) for path, var in flat_params(module).items()})


def place_replicated(module: Any, mesh: Mesh) -> Any:
    """A module (the draft head) with every parameter replicated on ``mesh``."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return with_values(module, {path: put(var[...], sharding) for path, var in flat_params(module).items()})


def put_like(array: Any, like: jax.Array) -> jax.Array:
    """A host array placed as ``like`` is (so that a compiled program that took ``like`` takes it too)."""
    if isinstance(like.sharding, NamedSharding):
        return put(np.asarray(array, like.dtype), like.sharding)
    return jax.device_put(np.asarray(array, like.dtype), like.sharding)


def to_host(tree: Any) -> Any:
    """``jax.device_get`` that also works for arrays spread over several processes (every process gets
    the whole array)."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:  # every process holds all of it
                return x.addressable_data(0)
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.device_get(jax.tree.map(get, tree))
