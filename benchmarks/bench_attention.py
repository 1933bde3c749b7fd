#!/usr/bin/env python
"""What attention costs as the cache's capacity grows past the live length.

Two parts, printed as tables and written to JSON:

1. Step times. One target forward of T new tokens (T = 1: a plain decode
   step; T = 8 and 64: the verify forward of a tree of that many tokens) with
   L tokens committed, for each live length L in --live, once in a cache of
   capacity L (plus room for the T new tokens) and once in a cache of
   --capacity slots. A backend whose cost follows the live length shows a
   ratio near 1; one that scores every slot shows capacity / L. The cache
   holds random K/V (attention's cost does not depend on the values), so no
   prefill of L tokens is needed. Every backend in --attention is measured in
   the same run, interleaved over backends and capacities.
2. Compiled memory (--memory). ``compiled.memory_analysis()`` of the plain
   and the speculative decode loop (and of the whole speculative generation,
   prefill included) for the --memory-preset shape with a --memory-capacity
   cache, from abstract weights: nothing is allocated, so the full Qwen3-4B
   shape with a 32k cache compiles on a laptop. "total" is arguments +
   outputs + temporaries - aliased (donated) bytes: what the program needs.

    python benchmarks/bench_attention.py --random-init qwen3-0.6b --live 256,2048 --capacity 16384
    python benchmarks/bench_attention.py --memory --memory-preset qwen3-4b --memory-capacity 32768 --no-steps
    python benchmarks/bench_attention.py --random-init qwen3-4b --dtype bfloat16 --attention auto,reference
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eagle3_jax import apply_default_flags  # noqa: E402

apply_default_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_decode import PRESETS, random_models  # noqa: E402
from flax import nnx  # noqa: E402

from eagle3_jax import Eagle3Config, Eagle3DraftHead, KVCache, Qwen3ForCausalLM  # noqa: E402
from eagle3_jax.attention import AttentionMetadata  # noqa: E402
from eagle3_jax.decoding import plain, speculative  # noqa: E402
from eagle3_jax.decoding.common import DecodeSettings, RuntimeParams  # noqa: E402
from eagle3_jax.decoding.tree import TreeSpec  # noqa: E402

GB = 1e9


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# ------------------------------------------------------------------ step times

def _forward_fn(graphdef, backend: str):
    @functools.partial(jax.jit, donate_argnums=(1,))
    def forward(weights, cache, tokens):
        model = nnx.merge(graphdef, weights)
        meta = AttentionMetadata.causal(cache.lengths, tokens.shape[1], backend=backend)
        out = model(tokens, cache, meta)
        return out.logits, out.cache
    return forward


def _random_cache(cfg, batch: int, capacity: int, live: int, dtype, seed: int = 0) -> KVCache:
    cache = KVCache.create(num_layers=cfg.num_hidden_layers, batch=batch, capacity=capacity,
                           kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=dtype)
    key = jax.random.PRNGKey(seed)
    fill = jax.tree.map(lambda x: jax.random.normal(key, x.shape, x.dtype) if x.ndim > 1 else x, cache)
    return fill.with_lengths(jnp.full((batch,), live, jnp.int32))


def step_times(target, *, lives, capacity: int, sizes, backends, batch: int, repeats: int) -> list[dict]:
    """Median ms per forward of T tokens at live length L, in a cache of L + room slots and of ``capacity``.

    For each (L, T), every backend at both capacities is compiled and warmed
    up, then the repeats run interleaved over all of them, so that machine
    noise falls on every configuration alike.
    """
    cfg = target.config
    graphdef, weights = nnx.split(target)
    room = max(sizes)
    fns = {b: _forward_fn(graphdef, b) for b in backends}
    rows = []
    for live in lives:
        caches = {cap: _random_cache(cfg, batch, cap, live, target.dtype)
                  for cap in sorted({live + room, max(capacity, live + room)})}
        for t in sizes:
            tokens = jnp.ones((batch, t), jnp.int32)
            runs = [(b, cap) for b in backends for cap in caches]
            times = {run: [] for run in runs}
            for _ in range(repeats + 1):  # the first round compiles and warms up
                for b, cap in runs:
                    t0 = time.perf_counter()
                    out, caches[cap] = fns[b](weights, caches[cap], tokens)
                    jax.block_until_ready(out)
                    times[(b, cap)].append(time.perf_counter() - t0)
            for b, cap in runs:
                rows.append({"backend": b, "live": live, "capacity": cap, "tokens": t,
                             "ms": 1e3 * statistics.median(times[(b, cap)][1:])})
                print(f"  {b:>10}  live {live:>6}  capacity {cap:>6}  T {t:>3}  {rows[-1]['ms']:9.2f} ms", flush=True)
        del caches
    return rows


def capacity_table(rows: list[dict]) -> list[dict]:
    """Per (backend, live, T): ms at capacity ~ live, ms at the large capacity, their ratio."""
    out = []
    keys = sorted({(r["backend"], r["live"], r["tokens"]) for r in rows})
    for b, live, t in keys:
        group = sorted((r for r in rows if (r["backend"], r["live"], r["tokens"]) == (b, live, t)),
                       key=lambda r: r["capacity"])
        small, large = group[0], group[-1]
        out.append({"backend": b, "live": live, "tokens": t, "capacity_small": small["capacity"],
                    "ms_small": small["ms"], "capacity_large": large["capacity"], "ms_large": large["ms"],
                    "ratio": large["ms"] / small["ms"]})
    return out


# ------------------------------------------------------------------ compiled memory

def _abstract(module_fn):
    return nnx.split(nnx.eval_shape(module_fn))


def compiled_memory(preset: str, dtype, capacity: int, backend: str, prompt_len: int, max_new_tokens: int,
                    spec: TreeSpec) -> dict:
    """memory_analysis() of the plain loop, the speculative loop and the whole speculative generation."""
    cfg = PRESETS[preset]
    hcfg = Eagle3Config.for_target(cfg, draft_vocab_size=min(32000, cfg.vocab_size))
    tg, tw = _abstract(lambda: Qwen3ForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    dg, dw = _abstract(lambda: Eagle3DraftHead(hcfg, dtype=dtype, rngs=nnx.Rngs(1)))
    kw = dict(max_new_tokens=max_new_tokens, capacity=capacity, cache_dtype=jnp.dtype(dtype))
    settings = DecodeSettings(**kw, attention=backend)
    params = RuntimeParams.make()
    tokens = jax.ShapeDtypeStruct((1, prompt_len), jnp.int32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)

    def spec_start(tw, dw, tokens, lengths, rng):
        return speculative.start(nnx.merge(tg, tw), nnx.merge(dg, dw), tokens, lengths, rng, params, settings, spec)

    def spec_loop(tw, dw, state):
        return speculative.decode_loop(nnx.merge(tg, tw), nnx.merge(dg, dw), state, params, settings, spec)

    def spec_generate(tw, dw, tokens, lengths, rng):
        return spec_loop(tw, dw, spec_start(tw, dw, tokens, lengths, rng)).result

    def plain_start(tw, tokens, lengths, rng):
        return plain.start(nnx.merge(tg, tw), tokens, lengths, rng, params, settings)

    def plain_loop(tw, state):
        return plain.decode_loop(nnx.merge(tg, tw), state, params, settings)

    out = {"preset": preset, "dtype": jnp.dtype(dtype).name, "capacity": capacity, "backend": backend,
           "platform": jax.default_backend(),
           "weights_gb": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tw)) / GB,
           "head_gb": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(dw)) / GB}
    programs = {
        "plain loop": (plain_loop, (tw, jax.eval_shape(plain_start, tw, tokens, lengths, rng)), (1,)),
        "speculative loop": (spec_loop, (tw, dw, jax.eval_shape(spec_start, tw, dw, tokens, lengths, rng)), (2,)),
        "speculative generate": (spec_generate, (tw, dw, tokens, lengths, rng), ()),
    }
    for name, (fn, args, donate) in programs.items():
        t0 = time.perf_counter()
        compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
        ma = compiled.memory_analysis()
        row = {"compile_s": time.perf_counter() - t0}
        for field in ("argument", "output", "alias", "temp"):
            row[f"{field}_gb"] = getattr(ma, f"{field}_size_in_bytes") / GB
        row["total_gb"] = row["argument_gb"] + row["output_gb"] + row["temp_gb"] - row["alias_gb"]
        out[name] = row
        print(f"  {name:>21}: args {row['argument_gb']:7.2f} GB  temp {row['temp_gb']:7.2f} GB  "
              f"out {row['output_gb']:6.2f} GB  aliased {row['alias_gb']:6.2f} GB  total {row['total_gb']:7.2f} GB"
              f"  (compiled in {row['compile_s']:.0f} s)", flush=True)
    return out


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random-init", default="qwen3-0.6b", choices=sorted(PRESETS), help="model shape for step times")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: float32 on CPU, bfloat16 elsewhere")
    p.add_argument("--live", type=_ints, default=[256, 2048, 8192, 32768], help="live (committed) lengths")
    p.add_argument("--capacity", type=int, default=32768, help="the large cache capacity")
    p.add_argument("--tokens", type=_ints, default=[1, 8, 64], help="new tokens per forward (1: decode)")
    p.add_argument("--attention", default="default",
                   help="comma-separated backends to compare in one run ('default': the platform's default)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-steps", action="store_true", help="skip the step times")
    p.add_argument("--memory", action="store_true", help="also report the compiled loops' memory")
    p.add_argument("--memory-preset", default="qwen3-4b", choices=sorted(PRESETS))
    p.add_argument("--memory-capacity", type=int, default=32768)
    p.add_argument("--memory-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="float32 on CPU, where the compiler adds no bfloat16 up-casts")
    p.add_argument("--out", default="bench_out/attention.json", help="JSON output path")
    args = p.parse_args(argv)

    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    dtype = jnp.dtype(dtype)
    # 'default': the backend DecodeSettings picks when none is named (the platform's)
    backends = [DecodeSettings(1, 1).attention if b == "default" else b for b in args.attention.split(",") if b]
    result = {"platform": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
              "jax": jax.__version__, "preset": args.random_init, "dtype": dtype.name, "batch": args.batch}
    if not args.no_steps:
        target, _ = random_models(args.random_init, dtype)
        print(f"step times: {args.random_init} {dtype.name} batch {args.batch} on {result['device']}")
        rows = step_times(target, lives=args.live, capacity=args.capacity, sizes=args.tokens, backends=backends,
                          batch=args.batch, repeats=args.repeats)
        table = capacity_table(rows)
        result["steps"], result["capacity_table"] = rows, table
        print(f"\n| backend | live | T | ms at capacity ~live | ms at capacity {args.capacity} | ratio |")
        print("|---|---|---|---|---|---|")
        for r in table:
            print(f"| {r['backend']} | {r['live']} | {r['tokens']} | {r['ms_small']:.2f} ({r['capacity_small']}) | "
                  f"{r['ms_large']:.2f} ({r['capacity_large']}) | {r['ratio']:.2f}x |")
    if args.memory:
        print(f"\ncompiled memory: {args.memory_preset} {args.memory_dtype}, capacity {args.memory_capacity}")
        result["memory"] = [compiled_memory(args.memory_preset, jnp.dtype(args.memory_dtype), args.memory_capacity, b,
                                            prompt_len=512, max_new_tokens=1024, spec=TreeSpec(3, 1, 4))
                            for b in backends]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
