"""The runner: a target (and a draft head) on one device or a device mesh, and the compiled programs of
one decoder (docs/architecture.md#the-runner).

:class:`Generator` and the server's :class:`~eagle3_jax.serve.engine.BatchEngine`
both run through a :class:`Runner`: it owns the weights (placed on their
shards on a mesh), the mesh, and a :class:`Decoder` -- the strategy, plain
or speculative, that names the compiled start (prefill) and loop programs
and their static arguments. The host loops above it only ever see loop
states (whose arrays declare their own layouts, ``axes.constrain_tree``)
and host arrays; the runner places inputs, runs every program inside the
mesh; the host loops end rows through the one finish-code type
(:class:`~eagle3_jax.decoding.common.Finish`, written back by ``with_finish_codes``).

Programs (each returns its loop state laid out by its declared axes, so that
on a mesh the prefill's output, a loop chunk's and the next chunk's input
are one program's):

    start(graphdefs, statics, weights, tokens, lengths, rng, params) -> state
    loop(graphdefs, statics, weights, state, params, max_iterations) -> state
    insert_row(state, row_state, row) -> state        (the server's admission)
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eagle3_jax.axes import constrain_tree
from eagle3_jax.compiled import CompiledFunction
from eagle3_jax.decoding import plain, speculative
from eagle3_jax.decoding.common import DecodeSettings, RuntimeParams, with_all_finished
from eagle3_jax.decoding.tree import TreeSpec
from eagle3_jax.errors import InputError
from eagle3_jax.models.eagle3 import Eagle3DraftHead
from eagle3_jax.models.target import TargetModel
from eagle3_jax.sharding import ShardingPlan, check_mesh, place_replicated, place_target, put, put_tree, to_host

# ------------------------------------------------------------------ the compiled programs


def _plain_start(graphdef, settings, weights, tokens, lengths, rng, params):
    return constrain_tree(plain.start(nnx.merge(graphdef, weights), tokens, lengths, rng, params, settings))


def _plain_loop(graphdef, settings, weights, state, params, max_iterations):
    return constrain_tree(plain.decode_loop(nnx.merge(graphdef, weights), state, params, settings, max_iterations))


def _spec_start(graphdefs, statics, weights, tokens, lengths, rng, params):
    target, draft = nnx.merge(graphdefs[0], weights[0]), nnx.merge(graphdefs[1], weights[1])
    return constrain_tree(speculative.start(target, draft, tokens, lengths, rng, params, *statics))


def _spec_loop(graphdefs, statics, weights, state, params, max_iterations):
    target, draft = nnx.merge(graphdefs[0], weights[0]), nnx.merge(graphdefs[1], weights[1])
    return constrain_tree(speculative.decode_loop(target, draft, state, params, *statics, max_iterations))


def _insert_row(state, row_state, row):
    """``state`` with row ``row`` replaced by the one-row ``row_state`` (same structure, batch 1).

    Every array leaf with a leading batch axis takes the row; scalars (the
    iteration counter) keep the batch's value.
    """
    def put_row(big, small):
        if big.ndim == 0:
            return big
        return jax.lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), row, axis=0)

    return constrain_tree(jax.tree.map(put_row, state, row_state))


def _describe(what: str, with_bucket: bool) -> Callable[..., str]:
    """The compile messages' text: 'the speculative loop (batch 1, cache 256, tree 4,1,5)'."""

    def describe(graphdefs, statics, weights, data, *_):
        settings, spec = statics if isinstance(statics, tuple) else (statics, None)
        shape = (data if with_bucket else data.result.tokens).shape
        parts = [f"batch {shape[0]}"] + ([f"prompt bucket {shape[1]}"] if with_bucket else [])
        parts.append(f"cache {settings.capacity}")
        if spec is not None:
            parts.append(f"tree {spec.num_steps},{spec.topk},{spec.num_draft_tokens}")
        return f"{what} ({', '.join(parts)})"

    return describe


PLAIN_START = CompiledFunction(_plain_start, num_static=2, describe=_describe("the prefill", True))
PLAIN_LOOP = CompiledFunction(_plain_loop, num_static=2, donate_argnums=(3,),
                              describe=_describe("the decode loop", False))
SPEC_START = CompiledFunction(_spec_start, num_static=2, describe=_describe("the speculative prefill", True))
SPEC_LOOP = CompiledFunction(_spec_loop, num_static=2, donate_argnums=(3,),
                             describe=_describe("the speculative loop", False))
INSERT_ROW = CompiledFunction(_insert_row, num_static=0, donate_argnums=(0,), describe="the row insertion")
_LAYOUT = jax.jit(constrain_tree)


# ------------------------------------------------------------------ decoders


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A decoding strategy: its compiled programs and their static arguments.

    Attributes:
      name: 'plain' or 'speculative'.
      start, loop: the compiled prefill and loop programs.
      spec: the static tree shape (speculative), or None.
    """

    name: str
    start: CompiledFunction
    loop: CompiledFunction
    spec: TreeSpec | None = None

    def statics(self, settings: DecodeSettings) -> Any:
        """The programs' static arguments after the graphs: the settings (and the tree shape)."""
        return (settings, self.spec) if self.spec is not None else settings

    @property
    def num_compiles(self) -> int:
        """Compilations so far by every runner of this kind (prefill and loop together)."""
        return self.start.num_compiles + self.loop.num_compiles


PLAIN = Decoder("plain", PLAIN_START, PLAIN_LOOP)


def speculative_decoder(spec: TreeSpec) -> Decoder:
    """The EAGLE-3 decoder with the static tree ``spec``."""
    return Decoder("speculative", SPEC_START, SPEC_LOOP, spec)


# ------------------------------------------------------------------ the runner


def check_models(target: Any, draft: Any = None) -> None:
    """Raises InputError unless ``target`` is a loaded target and ``draft`` None or a loaded head."""
    if not isinstance(target, TargetModel):
        raise InputError(f"target must be a loaded Qwen3ForCausalLM or LlamaForCausalLM (see load_target), "
                         f"got {type(target).__name__}")
    if draft is not None and not isinstance(draft, Eagle3DraftHead):
        raise InputError(f"draft must be a loaded Eagle3DraftHead (see load_draft), got {type(draft).__name__}")


class Runner:
    """A target (and an EAGLE-3 head) ready to run, on one device or a ``(data, tensor)`` mesh.

    Args:
      target: a loaded target (:class:`~eagle3_jax.models.target.TargetModel`).
      draft: an :class:`Eagle3DraftHead` (checked against the target), or None: plain decoding.
      spec: the static tree shape, with a draft.
      mesh: a ``(data, tensor)`` mesh (:func:`eagle3_jax.sharding.make_mesh`), or None: one device.
        The target is placed on its shards (tensor-parallel), the head replicated; the given
        models keep their own arrays. A batch is padded to a multiple of the data axis.
    """

    def __init__(self, target: TargetModel, draft: Eagle3DraftHead | None = None, *, spec: TreeSpec | None = None,
                 mesh=None):
        check_models(target, draft)
        if (draft is None) != (spec is None):
            raise InputError("a draft head and a tree shape go together (both or neither)")
        self.config = target.config
        self.mesh = check_mesh(mesh)
        self.plan = None
        if self.mesh is not None:
            self.plan = ShardingPlan.for_target(self.mesh, self.config)
            for note in self.plan.notes:
                warnings.warn(note, stacklevel=3)
            target = place_target(target, self.plan)
            draft = place_replicated(draft, self.mesh) if draft is not None else None
        target_graph, target_weights = nnx.split(target)
        if draft is None:
            self.decoder, self.draft_config = PLAIN, None
            self._graphdefs, self._weights = target_graph, target_weights
        else:
            draft.config.check_target(target.config)
            self.decoder, self.draft_config = speculative_decoder(spec), draft.config
            draft_graph, draft_weights = nnx.split(draft)
            self._graphdefs, self._weights = (target_graph, draft_graph), (target_weights, draft_weights)

    @property
    def spec(self) -> TreeSpec | None:
        return self.decoder.spec

    @property
    def speculative(self) -> bool:
        return self.decoder.spec is not None

    @property
    def data_parallel(self) -> int:
        return self.plan.data_parallel if self.plan is not None else 1

    def padded_rows(self, n: int) -> int:
        """Rows of a batch of ``n`` prompts: a power of two per data shard (1, 2, 4, 8, ...) times the mesh's
        data axis, so that batches of 5 to 8 prompts share one compiled program. The rows past the
        prompts end at the prefill; they cost their share of each forward."""
        per_shard = -(-n // self.data_parallel)
        return (1 << (per_shard - 1).bit_length()) * self.data_parallel

    def on_mesh(self):
        """The context the compiled programs are traced and run in: ``jax.set_mesh`` on a mesh."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # -------------------------------------------------------------- programs

    def prefill(self, settings: DecodeSettings, tokens: np.ndarray, lengths: np.ndarray, rng: jax.Array,
                params: RuntimeParams) -> tuple[Any, float]:
        """Prefills right-padded prompts ``tokens`` [batch, bucket] of ``lengths`` [batch] and selects each
        row's first token: (loop state, seconds spent compiling)."""
        with self.on_mesh():
            return self.decoder.start(self._graphdefs, self.decoder.statics(settings), self._weights,
                                      *self._inputs(tokens, lengths, rng, params))

    def run(self, settings: DecodeSettings, state: Any, params: RuntimeParams, max_iterations: int
            ) -> tuple[Any, float]:
        """Runs the loop until every row has finished or ``max_iterations`` more iterations have run:
        (loop state, seconds spent compiling). ``state`` is donated."""
        with self.on_mesh():
            return self.decoder.loop(self._graphdefs, self.decoder.statics(settings), self._weights, state,
                                     self._replicated(params), jnp.int32(max_iterations))

    def insert_row(self, state: Any, row_state: Any, row: int) -> tuple[Any, float]:
        """``state`` with row ``row`` replaced by a one-row prefill's state (donated): (state, compile seconds)."""
        with self.on_mesh():
            return INSERT_ROW(state, row_state, jnp.int32(row))

    def empty_state(self, settings: DecodeSettings, batch: int, bucket: int, params: RuntimeParams) -> Any:
        """A loop state of ``batch`` rows, all finished (zeros; finish codes 'length'), from the prefill's
        abstract output (nothing compiled but its layout), laid out as the loop's."""
        tokens = jax.ShapeDtypeStruct((batch, bucket), jnp.int32)
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
        with self.on_mesh():
            shapes = self.decoder.start.eval_shape(self._graphdefs, self.decoder.statics(settings), self._weights,
                                                   tokens, lengths, jax.random.key(0), params)

        def zeros(s):
            if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
                return jax.random.split(jax.random.key(0), s.shape[0]) if s.ndim else jax.random.key(0)
            return jnp.zeros(s.shape, s.dtype)

        state = jax.tree.map(zeros, shapes)
        if self.mesh is not None:
            with self.on_mesh():
                state = _LAYOUT(state)
        return with_all_finished(state)

    @property
    def num_compiles(self) -> int:
        """Compilations so far by every runner of this decoder (prefill and loop together)."""
        return self.decoder.num_compiles

    # -------------------------------------------------------------- placement

    def _inputs(self, tokens: np.ndarray, lengths: np.ndarray, rng, params):
        """The prefill's inputs on the device(s): on a mesh, rows over ``data`` and the rest replicated."""
        if self.plan is None:
            return jnp.asarray(tokens), jnp.asarray(lengths), rng, params
        return (put(tokens, self.plan.sharding(tokens.shape, ("batch", None))),
                put(lengths, self.plan.sharding(lengths.shape, ("batch",))),
                put_tree(rng, self.plan.replicate), self._replicated(params))

    def _replicated(self, tree: Any) -> Any:
        return tree if self.plan is None else put_tree(tree, self.plan.replicate)


def finish_codes(state: Any) -> np.ndarray:
    """[batch] the rows' finish codes, on the host (a copy the caller may change)."""
    return np.array(to_host(state.result.finish_reason))
