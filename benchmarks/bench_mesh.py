#!/usr/bin/env python
"""Generation on a device mesh: memory per device, compile time, and a roofline of decode speed.

Three parts, printed as tables and written to JSON (--out):

1. Compiled programs by mesh shape (``data x tensor``): the whole
   speculative generation (prefill and loop) for random weights of a preset
   shape is compiled from abstract, sharded weights (nothing is allocated),
   and ``memory_analysis()`` gives its memory per device; with the compile
   time. On a CPU the devices are simulated (``XLA_FLAGS=
   --xla_force_host_platform_device_count``, set here when unset), and the
   CPU compiler's figures are float32 (in bfloat16 it up-casts weights to
   float32 temporaries that an accelerator does not have).
2. Memory per device by the sharding table, in the decode dtype: weights,
   KV cache and the replicated draft head (``eagle3_jax/sharding.py``).
3. A roofline of batch-1 decode on 1, 2, 4 and 8 accelerators: a step
   reads its weight shard and KV shard at the memory bandwidth and does two
   all-reduces of the hidden state per layer over the interconnect; the
   replicated draft head's steps do not shrink with the mesh. An estimate,
   not a measurement: it says what tensor parallelism can buy.

    python benchmarks/bench_mesh.py --preset qwen3-4b --meshes 1x1,1x2,1x4,1x8,2x4 --out bench_out/mesh_4b.json
    python benchmarks/bench_mesh.py --preset qwen3-32b --meshes 1x1,1x8 --no-compile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _meshes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(n) for n in part.lower().split("x")) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected meshes as DATAxTENSOR,... e.g. 1x2,2x4; got {text!r}") from None
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected meshes as DATAxTENSOR,... e.g. 1x2,2x4; got {text!r}")
    return shapes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["qwen3-4b"], help="model shapes (bench_decode.py PRESETS)")
    p.add_argument("--meshes", type=_meshes, default=_meshes("1x1,1x2,1x4,1x8,2x4"),
                   help="mesh shapes DATAxTENSOR to compile")
    p.add_argument("--batch", type=int, default=1, help="prompts per generation (a multiple of DATA is used)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--capacity", type=int, default=4096, help="KV slots per row")
    p.add_argument("--tree", default="3,1,4", help="the speculative tree D,K,N compiled")
    p.add_argument("--compile-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="the decode dtype of the memory table and the roofline")
    p.add_argument("--no-compile", action="store_true", help="skip part 1 (compiling)")
    p.add_argument("--hbm-tbps", type=float, default=2.7,
                   help="memory bandwidth a decode step streams weights at, TB/s (2.7: skinny cuBLAS matmuls "
                        "measured on one H200; its peak is 4.8)")
    p.add_argument("--link-gbps", type=float, default=450.0,
                   help="interconnect bandwidth per direction and device, GB/s (H200 NVLink: 450)")
    p.add_argument("--allreduce-us", type=float, default=8.0, help="latency of one small all-reduce, microseconds")
    p.add_argument("--tau", type=float, default=3.0, help="acceptance length assumed for the speculative roofline")
    p.add_argument("--context", type=int, default=2048, help="live KV length of the roofline's decode step")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    devices = max(d * t for d, t in args.meshes)
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={max(devices, 8)}").strip()
    import jax  # after XLA_FLAGS: the simulated device count is read when JAX starts
    from bench_decode import PRESETS

    unknown = [p for p in args.preset if p not in PRESETS]
    if unknown:
        print(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}", file=sys.stderr)
        return 2
    if devices > len(jax.devices()):
        print(f"a mesh of {devices} devices, but {len(jax.devices())} are available", file=sys.stderr)
        return 2
    result = {"platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "presets": {}}
    for preset in args.preset:
        cfg = PRESETS[preset]
        row = result["presets"][preset] = {}
        print(f"\n{preset}: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
              f"{cfg.num_key_value_heads} KV heads, vocabulary {cfg.vocab_size}")
        row["memory"] = memory_table(cfg, args)
        row["roofline"] = roofline_table(cfg, args)
        if not args.no_compile:
            row["compiled"] = compile_table(cfg, args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


# ------------------------------------------------------------------ the sharding table's memory

GB = 1e9


def _head_config(cfg):
    from eagle3_jax import Eagle3Config

    return Eagle3Config.for_target(cfg, draft_vocab_size=min(32000, cfg.vocab_size))


def per_device_bytes(cfg, tensor: int, data: int, *, itemsize: int, batch: int, capacity: int) -> dict:
    """Weights, KV cache and draft head per device, from the sharding table (abstract shapes)."""
    import jax
    import numpy as np
    from flax import nnx

    from eagle3_jax import Eagle3DraftHead, Qwen3ForCausalLM
    from eagle3_jax.axes import LOGICAL_TO_MESH
    from eagle3_jax.sharding import param_axes
    from eagle3_jax.weights.params import flat_params

    abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    replicated = {"kv_heads"} if cfg.num_key_value_heads % tensor else set()
    weights = 0
    axes = param_axes(abstract)
    for path, var in flat_params(abstract).items():
        split = 1
        for dim, axis in zip(var.shape, axes[path]):
            if axis and LOGICAL_TO_MESH.get(axis) == "tensor" and axis not in replicated and dim % tensor == 0:
                split = tensor
        weights += int(np.prod(var.shape)) * itemsize // split
    head = nnx.eval_shape(lambda: Eagle3DraftHead(_head_config(cfg), rngs=nnx.Rngs(0)))
    head_bytes = sum(int(np.prod(x.shape)) * (itemsize if x.dtype.kind == "f" else x.dtype.itemsize)
                     for x in jax.tree.leaves(nnx.state(head)))
    kv_split = 1 if replicated else tensor
    rows = -(-batch // data)
    kv = 2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * capacity * cfg.head_dim * itemsize // kv_split
    return {"weights": weights, "kv_cache": kv, "draft_head": head_bytes, "kv_replicated": bool(replicated)}


def memory_table(cfg, args) -> list[dict]:
    itemsize = 2 if args.dtype == "bfloat16" else 4
    rows = []
    print(f"\nmemory per device by the sharding table ({args.dtype}, batch {args.batch}, {args.capacity} KV slots)")
    print(f"{'mesh':>6} {'devices':>8} {'weights GB':>11} {'KV cache GB':>12} {'head GB':>8} {'total GB':>9}")
    for data, tensor in args.meshes:
        if cfg.num_attention_heads % tensor:
            continue
        b = per_device_bytes(cfg, tensor, data, itemsize=itemsize, batch=max(args.batch, data),
                             capacity=args.capacity)
        total = b["weights"] + b["kv_cache"] + b["draft_head"]
        row = {"mesh": f"{data}x{tensor}", "devices": data * tensor, **{k: v / GB if k != "kv_replicated" else v
                                                                       for k, v in b.items()}, "total": total / GB}
        rows.append(row)
        note = "  (KV replicated)" if b["kv_replicated"] else ""
        print(f"{row['mesh']:>6} {row['devices']:>8} {row['weights']:>11.2f} {row['kv_cache']:>12.3f} "
              f"{row['draft_head']:>8.2f} {row['total']:>9.2f}{note}")
    return rows


# ------------------------------------------------------------------ roofline

def roofline_table(cfg, args) -> list[dict]:
    """Batch-1 decode: a step streams the weight shard and live-KV shard, and all-reduces the hidden state
    twice per layer; a speculative cycle is one verify forward (memory-bound: about one step, its all-reduces
    N tokens wide) plus D draft steps of the replicated head."""
    itemsize = 2 if args.dtype == "bfloat16" else 4
    d, _, n = (int(x) for x in args.tree.split(","))
    bw, link, alpha = args.hbm_tbps * 1e12, args.link_gbps * 1e9, args.allreduce_us * 1e-6
    rows = []
    print(f"\nroofline of batch-1 decode ({args.dtype}; {args.hbm_tbps} TB/s memory, {args.link_gbps} GB/s links, "
          f"{args.allreduce_us} us per all-reduce; live KV {args.context}; speculative: tree {args.tree}, "
          f"tau {args.tau}) -- an estimate")
    print(f"{'devices':>8} {'step ms':>8} {'of it comm':>10} {'plain tok/s':>12} {'spec tok/s':>11} {'scaling':>8}")
    base = None
    for tensor in (1, 2, 4, 8):
        if cfg.num_attention_heads % tensor:
            continue
        b = per_device_bytes(cfg, tensor, 1, itemsize=itemsize, batch=1, capacity=args.context)
        hidden_bytes = cfg.hidden_size * itemsize

        def comm(tokens: int, tensor=tensor, hidden_bytes=hidden_bytes) -> float:
            if tensor == 1:
                return 0.0
            ring = 2 * (tensor - 1) / tensor * tokens * hidden_bytes / link
            return 2 * cfg.num_hidden_layers * (alpha + ring)

        step = (b["weights"] + b["kv_cache"]) / bw + comm(1)
        draft_step = b["draft_head"] / bw  # replicated: every device reads the whole head
        cycle = step + comm(n) - comm(1) + d * draft_step
        plain, spec = 1 / step, args.tau / cycle
        base = base or plain
        rows.append({"devices": tensor, "step_ms": step * 1e3, "comm_ms": comm(1) * 1e3, "plain_tok_s": plain,
                     "spec_tok_s": spec, "scaling": plain / base})
        print(f"{tensor:>8} {step * 1e3:>8.2f} {comm(1) * 1e3:>9.2f}  {plain:>12.0f} {spec:>11.0f} "
              f"{plain / base:>7.2f}x")
    return rows


# ------------------------------------------------------------------ compiled programs

def compile_table(cfg, args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from eagle3_jax import Eagle3DraftHead, Qwen3ForCausalLM
    from eagle3_jax.decoding import speculative
    from eagle3_jax.decoding.common import DecodeSettings, RuntimeParams
    from eagle3_jax.decoding.tree import TreeSpec
    from eagle3_jax.sharding import ShardingPlan, make_mesh
    from eagle3_jax.weights.params import flat_params

    dtype = jnp.dtype(args.compile_dtype)
    spec = TreeSpec.resolve(*(int(x) for x in args.tree.split(",")))
    tg, tw = nnx.split(nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0))))
    dg, dw = nnx.split(nnx.eval_shape(lambda: Eagle3DraftHead(_head_config(cfg), dtype=dtype, rngs=nnx.Rngs(1))))
    settings = DecodeSettings(max_new_tokens=args.capacity - args.prompt_len, capacity=args.capacity,
                              cache_dtype=dtype)
    params = RuntimeParams.make()
    paths = list(flat_params(nnx.merge(tg, tw)))

    def generate(tw, dw, tokens, lengths, rng):
        target, draft = nnx.merge(tg, tw), nnx.merge(dg, dw)
        state = speculative.start(target, draft, tokens, lengths, rng, params, settings, spec)
        return speculative.decode_loop(target, draft, state, params, settings, spec).result

    rows = []
    print(f"\nthe whole speculative generation compiled per mesh ({jax.default_backend()} compiler, "
          f"{args.compile_dtype}, batch {args.batch}, {args.capacity} KV slots, tree {args.tree})")
    print(f"{'mesh':>6} {'devices':>8} {'args GB':>8} {'temp GB':>8} {'total GB':>9} {'compile s':>10}")
    for data, tensor in args.meshes:
        if cfg.num_attention_heads % tensor:
            print(f"{data}x{tensor}: skipped ({cfg.num_attention_heads} heads)")
            continue
        mesh = make_mesh(tensor, data)
        plan = ShardingPlan.for_target(mesh, cfg)
        leaves, treedef = jax.tree.flatten(tw)
        assert len(leaves) == len(paths)
        shardings = plan.param_shardings(nnx.merge(tg, tw))
        sharded_tw = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[p])
                                                  for p, x in zip(paths, leaves)])
        everywhere = NamedSharding(mesh, PartitionSpec())
        sharded_dw = jax.tree.map(lambda x, s=everywhere: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), dw)
        batch = -(-args.batch // data) * data
        tokens = jax.ShapeDtypeStruct((batch, args.prompt_len), jnp.int32,
                                      sharding=plan.sharding((batch, args.prompt_len), ("batch", None)))
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=plan.sharding((batch,), ("batch",)))
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=everywhere)
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = jax.jit(generate).lower(sharded_tw, sharded_dw, tokens, lengths, rng).compile()
        seconds = time.perf_counter() - t0
        ma = compiled.memory_analysis()
        row = {"mesh": f"{data}x{tensor}", "devices": data * tensor, "compile_s": seconds,
               **{f"{k}_gb": getattr(ma, f"{k}_size_in_bytes") / GB for k in ("argument", "output", "alias", "temp")}}
        row["total_gb"] = row["argument_gb"] + row["output_gb"] + row["temp_gb"] - row["alias_gb"]
        rows.append(row)
        print(f"{row['mesh']:>6} {row['devices']:>8} {row['argument_gb']:>8.2f} {row['temp_gb']:>8.2f} "
              f"{row['total_gb']:>9.2f} {seconds:>10.1f}", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
