"""Ahead-of-time compilation for chips this machine does not have (docs/architecture.md#ahead-of-time).

``compile_report`` compiles the project's programs (the prefills, the plain and speculative
loops, the server's loop and prefill) for a named *topology* from abstract weights (no weight
is read or allocated) and reports, per program and per chip, the bytes of its arguments,
outputs, aliased (donated) buffers and temporaries, whether that fits the chip's memory, and the
compile time. A TPU topology (``v5e:1x1``, ``v6e:2x2``, ``v5p:2x2x1``, ...) is compiled by the
real TPU compiler through libtpu (``pip install "jax[tpu]"``), on any machine: JAX's
``jax.experimental.topologies`` gives devices to compile for without the chips. ``cpu`` compiles
for this machine's own CPU.

Tracing happens inside :func:`~eagle3_jax.platform.compiling_for` the topology's platform, so
the programs are those that platform would run (its attention backend, its KV cache access).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from eagle3_jax.axes import constrain_tree
from eagle3_jax.config import Eagle3Config, Qwen3Config, TargetConfig
from eagle3_jax.decoding import plain, speculative
from eagle3_jax.decoding.common import ROW_STOP_SLOTS, RuntimeParams
from eagle3_jax.decoding.tree import TreeSpec
from eagle3_jax.errors import InputError
from eagle3_jax.models.eagle3 import Eagle3DraftHead
from eagle3_jax.models.registry import abstract_target
from eagle3_jax.planning import program_settings
from eagle3_jax.platform import compiling_for
from eagle3_jax.sharding import ShardingPlan, make_mesh
from eagle3_jax.weights.params import flat_params

GiB = 1 << 30

# Memory per chip (HBM), as the vendor states it; the compiler reserves a little of it.
CHIP_MEMORY = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
CHIP_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e",
              "TPU v6e": "v6e"}

PRESETS: dict[str, Callable[[], TargetConfig]] = {
    "qwen3-0.6b": lambda: Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                      num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                      head_dim=128, rope_theta=1e6, max_position_embeddings=40960,
                                      tie_word_embeddings=True, eos_token_ids=(151645,)),
    "qwen3-4b": Qwen3Config.qwen3_4b_thinking_2507,
    "qwen3-8b": lambda: Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                    head_dim=128, rope_theta=1e6, max_position_embeddings=40960,
                                    tie_word_embeddings=False, eos_token_ids=(151645,)),
    "qwen3-32b": lambda: Qwen3Config(vocab_size=151936, hidden_size=5120, intermediate_size=25600,
                                     num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8,
                                     head_dim=128, rope_theta=1e6, max_position_embeddings=40960,
                                     tie_word_embeddings=False, eos_token_ids=(151645,)),
}

PROGRAMS = ("prefill", "plain loop", "speculative prefill", "speculative loop", "server prefill", "server loop")


@dataclasses.dataclass(frozen=True)
class Topology:
    """Devices to compile for.

    Attributes:
      name: as given ("cpu", "v5e:1x1", "v6e:2x4", ...).
      platform: "cpu" or "tpu".
      chip: "cpu", "v4", "v5e", "v5p" or "v6e".
      devices: the devices (abstract for TPU: compile only).
      memory_bytes: memory per chip (None: unknown, the CPU).
    """

    name: str
    platform: str
    chip: str
    devices: tuple[Any, ...]
    memory_bytes: int | None


_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")


def topology(name: str) -> Topology:
    """The devices of ``name``: "cpu" (this machine's CPU devices), "local" (this process's default
    devices, e.g. a GPU, with the memory they report) or a TPU topology "CHIP:AxB" / "CHIP:AxBxC"
    with CHIP in v4, v5e, v5p, v6e (through libtpu)."""
    if name == "cpu":
        return Topology("cpu", "cpu", "cpu", tuple(jax.devices("cpu")), None)
    if name == "local":  # this process's own devices (a GPU or TPU machine): their reported memory
        devices = tuple(jax.devices())
        try:
            memory = int(devices[0].memory_stats()["bytes_limit"])
        except Exception:
            memory = None
        platform = "gpu" if devices[0].platform in ("gpu", "cuda", "rocm") else devices[0].platform
        return Topology("local", platform, str(devices[0].device_kind), devices, memory)
    m = _TOPOLOGY.match(name)
    if not m:
        raise InputError(f"unknown topology {name!r}; use 'cpu', 'local' or a TPU topology such as v5e:1x1, v5e:2x2, "
                         f"v6e:2x4, v5p:2x2x1 (chips: {', '.join(CHIP_MEMORY)})")
    chip = m.group(1)
    # Compiling touches no chip: let several processes load libtpu (it otherwise locks it to one).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - every supported JAX has it
        raise InputError(f"this JAX cannot compile for TPU topologies: {e}") from None
    chips = [int(x) for x in m.groups()[1:] if x is not None]
    kwargs = dict(chips_per_host_bounds=(1, 1, 1)) if chips == [1, 1] or chips == [1, 1, 1] else {}
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                            num_slices=1, **kwargs)
    except Exception as e:  # libtpu missing, or a topology it does not know
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = (f" (install libtpu: pip install 'jax[tpu]=={jax.__version__}')"
                if "libtpu" in text.lower() or "tpu" in text.lower() and "not" in text.lower() else "")
        raise InputError(f"cannot make TPU topology {name!r}: {text}{hint}") from None
    return Topology(name, "tpu", chip, tuple(desc.devices), CHIP_MEMORY[chip])


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program's memory per chip (bytes) and its compile time; ``error`` is the
    compiler's refusal (for example temporaries that exceed the chip's memory)."""

    program: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    compile_seconds: float
    fits: bool | None
    error: str | None = None

    @property
    def total_bytes(self) -> int:
        """What the program holds at once on a chip: arguments, outputs not aliased to an argument,
        and temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


def _abstract_head(config: TargetConfig, draft_vocab: int, dtype) -> tuple[Any, Any]:
    head_cfg = Eagle3Config.for_target(config, draft_vocab_size=min(draft_vocab, config.vocab_size))
    return nnx.split(nnx.eval_shape(lambda: Eagle3DraftHead(head_cfg, dtype=dtype, rngs=nnx.Rngs(1))))


def _placed(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_report(config: TargetConfig, topo: Topology, *, dtype: Any = jnp.bfloat16, capacity: int = 8192,
                   batch: int = 1, prompt_bucket: int = 128, tree: tuple[int, int, int] = (3, 1, 4),
                   draft_vocab: int = 32000, tensor_parallel: int = 1, data_parallel: int = 1,
                   server_batch: int | None = None, attention: str = "auto",
                   programs: Sequence[str] = PROGRAMS, log: Callable[[str], None] | None = None
                   ) -> list[ProgramReport]:
    """Compiles ``programs`` (names from :data:`PROGRAMS`) for ``topo`` and reports each.

    Args:
      config: the target's configuration (a preset, or a model directory's config.json).
      topo: from :func:`topology`.
      dtype: weights' and KV cache's dtype.
      capacity: KV slots per row (rounded up as the decoders allocate them).
      batch: rows of the library's programs; a multiple of ``data_parallel``.
      prompt_bucket: the prefills' padded prompt length.
      tree: the speculative tree (num_steps, topk, num_draft_tokens).
      draft_vocab: the draft head's vocabulary (a head of the target's shape is assumed).
      tensor_parallel, data_parallel: the mesh over the topology's first chips.
      server_batch: the server's rows (default ``batch``).
      attention: the attention backend ("auto": the topology platform's default).
    """
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        raise InputError(f"unknown program(s) {unknown}; choose from {', '.join(PROGRAMS)}")
    devices = tensor_parallel * data_parallel
    if devices > len(topo.devices):
        raise InputError(f"a mesh of {data_parallel} x {tensor_parallel} (data x tensor) needs {devices} chips; "
                         f"topology {topo.name} has {len(topo.devices)}")
    if batch % data_parallel:
        raise InputError(f"batch {batch} is not a multiple of data parallelism {data_parallel}")
    server_batch = server_batch or batch
    if server_batch % data_parallel:
        raise InputError(f"server batch {server_batch} is not a multiple of data parallelism {data_parallel}")
    if prompt_bucket >= capacity:
        raise InputError(f"prompt bucket {prompt_bucket} must be below the cache capacity {capacity}")
    log = log or (lambda line: None)
    spec = TreeSpec.resolve(*tree)
    mesh = make_mesh(tensor_parallel, data_parallel, devices=topo.devices)
    plan = ShardingPlan.for_target(mesh, config)
    everywhere = NamedSharding(mesh, PartitionSpec())

    with compiling_for(topo.platform), jax.set_mesh(mesh):
        abstract = abstract_target(config, dtype)
        shardings = plan.param_shardings(abstract)
        tg, tw = nnx.split(abstract)
        paths = list(flat_params(abstract))
        leaves, treedef = jax.tree.flatten(tw)
        tw = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[p])
                                          for p, x in zip(paths, leaves)])
        dg, dw = _abstract_head(config, draft_vocab, dtype)
        dw = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere), dw)
        # The library and the server run the same programs (planning.program_settings: sampling, stop ids and
        # token limits per row, traced); they differ in their rows and prompt buckets only.
        library = server = program_settings(capacity, jnp.dtype(dtype), attention)
        chunk = jax.ShapeDtypeStruct((), jnp.int32, sharding=everywhere)  # a loop run's iterations (traced)

        def inputs(rows: int, bucket: int):
            rows_sharding = plan.sharding((rows,), ("batch",))
            return (jax.ShapeDtypeStruct((rows, bucket), jnp.int32,
                                         sharding=plan.sharding((rows, bucket), ("batch", None))),
                    jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rows_sharding),
                    jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=everywhere))

        def params_for(rows: int):
            params = jax.eval_shape(lambda: RuntimeParams.per_row(
                [0.0] * rows, [1.0] * rows, [0] * rows, [[-1]] * rows, [1] * rows, stop_slots=ROW_STOP_SLOTS))
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere), params)

        def plain_start(tw, tokens, lengths, rng, params, settings):
            state = plain.start(nnx.merge(tg, tw), tokens, lengths, rng, params, settings)
            return constrain_tree(state)

        def plain_loop(tw, state, params, settings, iterations):
            state = plain.decode_loop(nnx.merge(tg, tw), state, params, settings, iterations)
            return constrain_tree(state)

        def spec_start(tw, dw, tokens, lengths, rng, params, settings):
            state = speculative.start(nnx.merge(tg, tw), nnx.merge(dg, dw), tokens, lengths, rng, params, settings,
                                      spec)
            return constrain_tree(state)

        def spec_loop(tw, dw, state, params, settings, iterations):
            state = speculative.decode_loop(nnx.merge(tg, tw), nnx.merge(dg, dw), state, params, settings, spec,
                                            iterations)
            return constrain_tree(state)

        reports = []
        started: dict[tuple, Any] = {}

        def run(name: str, fn, args, donate=()):
            t0 = time.perf_counter()
            try:
                compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
            except Exception as e:  # the compiler's refusal (e.g. out of memory) is a result, not a crash
                raise CompileFailure(name, _first_line(e)) from None
            seconds = time.perf_counter() - t0
            ma = compiled.memory_analysis()
            report = ProgramReport(name, ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes,
                                   ma.temp_size_in_bytes, seconds, None)
            fits = None if topo.memory_bytes is None else report.total_bytes <= topo.memory_bytes
            report = dataclasses.replace(report, fits=fits)
            reports.append(report)
            log(f"{name}: compiled in {seconds:.1f} s")
            return compiled

        def state_of(kind: str, rows: int, settings):
            """The loop state the matching prefill returns, as compiled inputs (shapes and shardings)."""
            key = (kind, rows)
            if key not in started:
                tokens, lengths, rng = inputs(rows, prompt_bucket)
                params = params_for(rows)
                if kind == "plain":
                    fn = jax.jit(lambda tw, t, n, r, p: plain_start(tw, t, n, r, p, settings))
                    lowered = fn.lower(tw, tokens, lengths, rng, params)
                else:
                    fn = jax.jit(lambda tw, dw, t, n, r, p: spec_start(tw, dw, t, n, r, p, settings))
                    lowered = fn.lower(tw, dw, tokens, lengths, rng, params)
                try:
                    compiled = lowered.compile()
                except Exception as e:
                    raise CompileFailure(kind, f"the prefill that makes its state does not compile: {_first_line(e)}"
                                         ) from None
                started[key] = _placed(lowered.out_info, compiled.output_shardings)
            return started[key]

        for name in programs:
            try:
                if name == "prefill":
                    run(name, lambda tw, t, n, r, p: plain_start(tw, t, n, r, p, library),
                        (tw, *inputs(batch, prompt_bucket), params_for(batch)))
                elif name == "speculative prefill":
                    run(name, lambda tw, dw, t, n, r, p: spec_start(tw, dw, t, n, r, p, library),
                        (tw, dw, *inputs(batch, prompt_bucket), params_for(batch)))
                elif name == "plain loop":
                    state = state_of("plain", batch, library)
                    run(name, lambda tw, s, p, c: plain_loop(tw, s, p, library, c),
                        (tw, state, params_for(batch), chunk), donate=(1,))
                elif name == "speculative loop":
                    state = state_of("speculative", batch, library)
                    run(name, lambda tw, dw, s, p, c: spec_loop(tw, dw, s, p, library, c),
                        (tw, dw, state, params_for(batch), chunk), donate=(2,))
                elif name == "server prefill":
                    run(name, lambda tw, dw, t, n, r, p: spec_start(tw, dw, t, n, r, p, server),
                        (tw, dw, *inputs(data_parallel, prompt_bucket), params_for(data_parallel)))
                elif name == "server loop":
                    state = state_of("speculative", server_batch, server)
                    run(name, lambda tw, dw, s, p, c: spec_loop(tw, dw, s, p, server, c),
                        (tw, dw, state, params_for(server_batch), chunk), donate=(2,))
            except CompileFailure as f:
                reports.append(ProgramReport(name, 0, 0, 0, 0, 0.0, False, error=f.message))
                log(f"{name}: does not compile: {f.message}")
    return reports


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class CompileFailure(Exception):
    def __init__(self, program: str, message: str):
        super().__init__(f"{program}: {message}")
        self.program, self.message = program, message
