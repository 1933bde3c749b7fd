"""Sharding as data: the logical axes of every parameter and of the KV cache, mapped to a device mesh
(docs/architecture.md#device-mesh).

A mesh has two axes, ``data`` (batch rows) and ``tensor`` (heads, MLP
columns, vocabulary). Each array names its dimensions with *logical* axes;
one table maps a logical axis to a mesh axis:

    batch     -> data      the rows of a generation or a training batch
    heads     -> tensor    query heads (q_proj's columns, o_proj's rows)
    kv_heads  -> tensor    key/value heads (k_proj, v_proj, the KV cache)
    mlp       -> tensor    the MLP's intermediate columns
    vocab     -> tensor    the embedding's rows, lm_head's columns
    embed     -> (whole)   the residual stream

:data:`TARGET_PARAM_AXES` gives each target parameter's logical axes (by
path, as data, like the weight-name rules of ``weights/rules.py``); the KV
cache names its own (``KVCache.axes``). The draft head and the tree
bookkeeping are small and replicated. That is Megatron-style tensor
parallelism: each device holds 1/N of the heads and MLP columns and of the KV
cache, and XLA's SPMD partitioner (GSPMD) inserts the all-reduces after
``o_proj`` and ``down_proj``. Attention runs per shard
(``eagle3_jax/attention/sharded.py``): every (row, KV head) is independent,
so it needs no communication.

A dimension that the mesh axis does not divide is kept whole (replicated) on
that axis -- :class:`ShardingPlan` says which, and refuses query heads that
do not divide (tensor parallelism over heads is the point of the axis).
Outside a mesh (``current_mesh()`` is None) every helper here is a no-op, so
single-device code is unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eagle3_jax.errors import InputError

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

_LAYER = r"model\.layers\.\d+\."
# Target parameter path (dotted, as eagle3_jax.weights.params.flat_params names them) -> logical axes.
# Kernels are Flax's [in, out]. Every parameter of every registered architecture matches exactly one row.
TARGET_PARAM_AXES: tuple[tuple[str, LogicalAxes], ...] = (
    (r"model\.embed_tokens\.embedding", ("vocab", "embed")),
    (_LAYER + r"self_attn\.q_proj\.kernel", ("embed", "heads")),
    (_LAYER + r"self_attn\.q_proj\.bias", ("heads",)),
    (_LAYER + r"self_attn\.[kv]_proj\.kernel", ("embed", "kv_heads")),
    (_LAYER + r"self_attn\.[kv]_proj\.bias", ("kv_heads",)),
    (_LAYER + r"self_attn\.o_proj\.kernel", ("heads", "embed")),
    (_LAYER + r"self_attn\.o_proj\.bias", ("embed",)),
    (_LAYER + r"self_attn\.[qk]_norm\.weight", (None,)),
    (_LAYER + r"(input|post_attention)_layernorm\.weight", ("embed",)),
    (_LAYER + r"mlp\.(gate|up)_proj\.kernel", ("embed", "mlp")),
    (_LAYER + r"mlp\.down_proj\.kernel", ("mlp", "embed")),
    (r"model\.norm\.weight", ("embed",)),
    (r"lm_head\.kernel", ("embed", "vocab")),
)

# The KV cache's buffers [batch, kv_heads, capacity, head_dim]; the draft head's cache keeps its heads whole.
KV_CACHE_AXES: LogicalAxes = ("batch", "kv_heads", None, None)
DRAFT_KV_CACHE_AXES: LogicalAxes = ("batch", None, None, None)


def target_param_axes(path: str) -> LogicalAxes:
    """The logical axes of a target parameter (dotted path); a ValueError for a path the table lacks."""
    found = [axes for pattern, axes in TARGET_PARAM_AXES if re.fullmatch(pattern, path)]
    if len(found) != 1:
        raise ValueError(f"parameter {path!r} matches {len(found)} rows of TARGET_PARAM_AXES (it needs exactly one)")
    return found[0]


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


def constrain_state(tree: Any, rows: int) -> Any:
    """Every array of a loop state laid out by one rule (a no-op outside a mesh): KV caches by their
    ``axes``, arrays of ``rows`` leading rows over ``data``, the rest replicated.

    Applied to what each compiled program returns, so that the prefill's state, a loop chunk's and
    the next chunk's input have the same shardings (another layout would be another program).
    """
    if current_mesh() is None:
        return tree
    from eagle3_jax.kv_cache import KVCache

    def layout(x):
        if isinstance(x, KVCache):
            return dataclasses.replace(x, k=tuple(constrain(b, x.axes) for b in x.k),
                                       v=tuple(constrain(b, x.axes) for b in x.v),
                                       lengths=constrain(x.lengths, x.axes[:1]))
        if not isinstance(x, jax.Array):
            return x
        if x.ndim and x.shape[0] == rows:
            return constrain(x, ("batch",) + (None,) * (x.ndim - 1))
        return constrain(x, (None,) * x.ndim)

    return jax.tree.map(layout, tree, is_leaf=lambda x: isinstance(x, KVCache))


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

    def param_sharding(self, path: str, shape: Sequence[int]) -> NamedSharding:
        """A target parameter's sharding (:data:`TARGET_PARAM_AXES`)."""
        return self.sharding(shape, target_param_axes(path))

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
    """A target module with every parameter placed on its shards (:data:`TARGET_PARAM_AXES`)."""
    from eagle3_jax.weights.params import flat_params, with_values

    values = {path: put(var[...], plan.param_sharding(path, var.shape)) for path, var in flat_params(module).items()}
    return with_values(module, values)


def place_replicated(module: Any, mesh: Mesh) -> Any:
    """A module (the draft head) with every parameter replicated on ``mesh``."""
    from eagle3_jax.weights.params import flat_params, with_values

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
