#!/usr/bin/env python
"""Plain vs speculative decoding speed, measured in one run.

Two parts, both printed as tables and written to JSON:

1. Step costs at a fixed context length: one plain decode step (target
   forward of 1 token), one verify forward of N tree tokens for each N in
   --verify-sizes, and one draft tree step (K tokens). With the cost model
   ``speedup = tau * t_decode / (t_verify(N) + D * t_draft)`` these say what
   acceptance length a tree shape needs to pay off on this machine.
2. End to end: ``Generator`` plain vs speculative on the same prompts, for
   each tree shape in --knobs: tokens/s, acceptance length, speedup.

Models: --target/--draft directories (real checkpoints; prompts from a JSONL
file, or the name of a benchmark slice shipped in eagle3_jax/data/bench, with the target's tokenizer and chat
template)
or --random-init PRESET (random weights of a known shape, random prompts;
a random head accepts almost nothing, so part 2 then measures the overhead).

    python benchmarks/bench_decode.py --random-init qwen3-4b --dtype bfloat16 --out bench_out/decode_4b.json
    python benchmarks/bench_decode.py --target T --draft D --prompts humaneval
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

from eagle3_jax import apply_default_flags

apply_default_flags()  # before JAX starts a backend: cuBLAS for the skinny decode matmuls on GPU, as the CLI

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eagle3_jax import Eagle3Config, Eagle3DraftHead, Generator, KVCache, Qwen3Config, Qwen3ForCausalLM
from eagle3_jax.aot import PRESETS as SHAPES
from eagle3_jax.attention import AttentionMetadata
from eagle3_jax.cli.options import knob_triple
from eagle3_jax.loading import load_draft, load_target, parse_dtype
from eagle3_jax.timing import interleaved, paired_speedup

# The package's model shapes (eagle3_jax/aot.py: qwen3-0.6b, qwen3-4b, qwen3-8b, qwen3-32b) and a small one.
PRESETS = {name: make() for name, make in SHAPES.items()} | {
    "small": Qwen3Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, rope_theta=1e6,
                         max_position_embeddings=8192, tie_word_embeddings=True, eos_token_ids=(2,)),
}


def random_models(preset: str, dtype, seed: int = 0):
    cfg = PRESETS[preset]
    target = Qwen3ForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    draft = Eagle3DraftHead(Eagle3Config.for_target(cfg, draft_vocab_size=min(32000, cfg.vocab_size)), dtype=dtype,
                            rngs=nnx.Rngs(seed + 1))
    return target, draft


def _median_seconds(fn, weights, cache, rest, repeats):
    """Median seconds of ``fn(weights, cache, *rest) -> (out, cache)``, threading the donated cache through."""
    out, cache = fn(weights, cache, *rest)
    jax.block_until_ready(out)  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out, cache = fn(weights, cache, *rest)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), cache


def step_costs(target, draft, *, context: int, batch: int, verify_sizes, topk: int, repeats: int):
    """Seconds per target forward of N tokens (N=1 is a plain decode step) and per draft step of K tokens."""
    cfg = target.config
    capacity = context + max(verify_sizes) + 64
    tg, tw = nnx.split(target)
    dg, dw = nnx.split(draft)
    lengths = jnp.full((batch,), context, jnp.int32)
    layers = draft.config.feature_layers(cfg)
    kv = KVCache.create(num_layers=cfg.num_hidden_layers, batch=batch, capacity=capacity,
                        kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=target.dtype)
    dkv = KVCache.create(num_layers=1, batch=batch, capacity=capacity, kv_heads=draft.config.num_key_value_heads,
                         head_dim=draft.config.head_dim, dtype=target.dtype)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def target_forward(weights, cache, tokens):
        model = nnx.merge(tg, weights)
        n = tokens.shape[1]
        out = model(tokens, cache, AttentionMetadata.causal(cache.lengths, n), feature_layers=layers if n > 1 else ())
        return out.logits, out.cache

    @functools.partial(jax.jit, donate_argnums=(1,))
    def draft_step(weights, cache, embed_weights, tokens, hidden):
        head, model = nnx.merge(dg, weights), nnx.merge(tg, embed_weights)
        k = tokens.shape[1]
        positions = jnp.broadcast_to(cache.lengths[:, None], tokens.shape)
        # a beam step: K tokens at one position, each seeing the prefix and itself
        meta = AttentionMetadata.window_of(cache.lengths, positions, jnp.arange(k)[None, :],
                                           jnp.eye(k, dtype=bool)[None])
        out = head(model.embed(tokens), hidden, cache, meta, hidden_is_features=False)
        return (out.logits, out.hidden), out.cache

    kv = kv.with_lengths(lengths)
    dkv = dkv.with_lengths(jnp.array(lengths))  # its own buffer: the caches are donated separately
    costs = {}
    for n in verify_sizes:
        costs[n], kv = _median_seconds(target_forward, tw, kv, (jnp.ones((batch, n), jnp.int32),), repeats)
    hidden = jnp.zeros((batch, topk, draft.config.hidden_size), target.dtype)
    draft_s, _ = _median_seconds(draft_step, dw, dkv, (tw, jnp.ones((batch, topk), jnp.int32), hidden), repeats)
    return costs, draft_s


def bench_prompts(args, target_dir, vocab_size):
    """Token-id prompts: random ones, or the first turns of a benchmark (a shipped slice's name or a JSONL file)."""
    rng = np.random.default_rng(0)
    if args.prompts is None:
        return [rng.integers(10, vocab_size, size=args.prompt_len).tolist() for _ in range(args.num_prompts)]
    from eagle3_jax.bench_prompts import read_benchmark_file, shipped_path
    from eagle3_jax.text import load_tokenizer, render_chat, token_ids

    path = args.prompts if os.path.exists(args.prompts) else shipped_path(args.prompts)
    if path is None:
        raise SystemExit(f"--prompts: {args.prompts} is neither a file nor a shipped benchmark slice")
    tok = load_tokenizer(target_dir)
    out = []
    for prompt in read_benchmark_file(path, args.num_prompts):
        text = prompt.turns[0]
        if getattr(tok, "chat_template", None):
            text = render_chat(tok, [{"role": "user", "content": text}], where=path)
        out.append(token_ids(tok, text, where=path))
    return out


def end_to_end(target, draft, prompts, knob_list, *, max_new_tokens, batch, repeats, mesh=None):
    """Plain and speculative generation on the same prompts, interleaved (eagle3_jax/timing.py).

    Every method generates each batch once untimed (compilation), then all
    methods run ``repeats`` times in alternating order, batch by batch; a
    repeat's tokens/s is its tokens over its seconds summed over the batches,
    and the speedup is the median of the per-repeat ratios with its spread.
    ``mesh``: run every method on this device mesh.
    """
    methods = {"plain": Generator(target, mesh=mesh)}
    for d, k, n in knob_list:
        methods[f"({d},{k},{n})"] = Generator(target, draft, num_steps=d, topk=k, num_draft_tokens=n, mesh=mesh)
    per_repeat = {name: [[0, 0.0] for _ in range(repeats)] for name in methods}
    taus = {name: [] for name in methods}
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        runs = {}
        for name, gen in methods.items():
            outs = gen.generate(chunk, max_new_tokens=max_new_tokens)  # compile and warm up this shape
            taus[name] += [o.acceptance_length for o in outs]
            runs[name] = functools.partial(gen.generate, chunk, max_new_tokens=max_new_tokens)
        for name, results in interleaved(runs, repeats).items():
            for r, (outs, seconds) in enumerate(results):
                per_repeat[name][r][0] += sum(len(o.token_ids) for o in outs)
                per_repeat[name][r][1] += seconds
    rows = []
    for name in methods:
        reps = per_repeat[name]
        tps = statistics.median(n / s for n, s in reps)
        ratio = paired_speedup(per_repeat["plain"], reps)
        rows.append({"knobs": name, "tokens_per_second": tps, "acceptance_length": float(np.mean(taus[name])),
                     "speedup": ratio.median, "speedup_low": ratio.low, "speedup_high": ratio.high,
                     "speedup_noise": ratio.noise if name != "plain" else False,
                     "speedup_text": ratio.describe() if name != "plain" else "1.00x",
                     "tokens": reps[0][0]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--target", help="target directory (with --draft)")
    src.add_argument("--random-init", choices=sorted(PRESETS), help="random weights of a known shape")
    p.add_argument("--draft", help="draft head directory (with --target)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--context", type=int, default=1024, help="context length for the step costs")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--verify-sizes", default="1,4,8,16,32,64", help="N values for the verify-step costs")
    p.add_argument("--knobs", type=knob_triple, nargs="+", default=[(3, 1, 4)], metavar="D,K,N",
                   help="tree shapes for the end-to-end runs (num_steps,topk,num_draft_tokens)")
    p.add_argument("--prompts", default=None,
                   help="a JSONL prompt file ({'turns': [...]} per line) or a shipped slice's name "
                        "(gsm8k, humaneval, math500, mtbench); default random")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64, help="length of random prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-end-to-end", action="store_true")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="end to end on a mesh: the target split over N devices (the step costs stay on one)")
    p.add_argument("--data-parallel", type=int, default=1, metavar="M", help="end to end: the batch over M groups")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.target and not args.draft:
        p.error("--target needs --draft")
    dtype = parse_dtype(args.dtype)
    if args.random_init:
        target, draft = random_models(args.random_init, dtype)
        label = f"random {args.random_init}"
    else:
        target = load_target(args.target, dtype=dtype)
        draft = load_draft(args.draft, target.config, dtype=dtype)
        label = args.target
    sizes = [int(x) for x in args.verify_sizes.split(",")]
    device = jax.devices()[0].device_kind
    print(f"model: {label}, dtype {jnp.dtype(dtype).name}, device {device}, batch {args.batch}, "
          f"context {args.context}")

    costs, draft_s = step_costs(target, draft, context=args.context, batch=args.batch, verify_sizes=sizes,
                                topk=max(k for _, k, _ in args.knobs), repeats=max(args.repeats, 5))
    base = costs[sizes[0]] if sizes[0] == 1 else None
    print(f"\n{'forward':>22s} {'ms':>9s} {'x decode':>9s}")
    for n, s in costs.items():
        ratio = f"{s / base:9.2f}" if base else ""
        print(f"{('decode (N=1)' if n == 1 else f'verify N={n}'):>22s} {s * 1e3:9.2f} {ratio}")
    print(f"{'draft step':>22s} {draft_s * 1e3:9.2f} {draft_s / base if base else float('nan'):9.2f}")
    result = {"model": label, "dtype": jnp.dtype(dtype).name, "device": device, "backend": jax.default_backend(),
              "batch": args.batch, "context": args.context,
              "step_ms": {"decode": costs.get(1, float("nan")) * 1e3,
                          **{f"verify_{n}": s * 1e3 for n, s in costs.items()}, "draft_step": draft_s * 1e3}}
    if base:
        print("\nacceptance length needed to break even, tau* = (t_verify(N) + D * t_draft) / t_decode:")
        for d, k, n in args.knobs:
            if n in costs:
                print(f"  ({d},{k},{n}): {(costs[n] + d * draft_s) / base:.2f}")

    if not args.skip_end_to_end:
        prompts = bench_prompts(args, args.target, target.config.vocab_size)
        mesh = None
        if args.tensor_parallel * args.data_parallel > 1:
            from eagle3_jax.sharding import make_mesh

            mesh = make_mesh(args.tensor_parallel, args.data_parallel)
            result["mesh"] = {"data": args.data_parallel, "tensor": args.tensor_parallel}
        rows = end_to_end(target, draft, prompts, args.knobs, max_new_tokens=args.max_new_tokens,
                          batch=args.batch, repeats=args.repeats, mesh=mesh)
        print(f"\n{'decoding':>12s} {'tok/s':>9s} {'accept len':>11s}  speedup (median of {args.repeats} interleaved "
              "repeats, lowest-highest)")
        for r in rows:
            print(f"{r['knobs']:>12s} {r['tokens_per_second']:9.1f} {r['acceptance_length']:11.2f}  "
                  f"{r['speedup_text']}")
        result["end_to_end"] = rows
        result["max_new_tokens"] = args.max_new_tokens
        result["num_prompts"] = len(prompts)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
