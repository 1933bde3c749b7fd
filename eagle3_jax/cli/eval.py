"""``eagle3-jax eval``: acceptance length per benchmark and tree shape."""

from __future__ import annotations

import argparse
import json
import sys

from eagle3_jax.cli.options import (
    HelpFormatter,
    add_head_overrides,
    add_runtime_options,
    add_sampling_options,
    bench_file,
    check_configs,
    head_overrides,
    knob_triple,
    load_tokenizer,
    positive_int,
)


def add_parser(sub) -> None:
    from eagle3_jax.evaluation import BENCHMARKS

    p = sub.add_parser(
        "eval",
        help="acceptance length per benchmark for a target, a head and tree shapes",
        description="Generate the prompts of each benchmark with speculative decoding for each tree shape and "
                    "report the acceptance length (generated tokens / verify forwards) as the model cards do. "
                    "Writes OUTPUT/results.md (a table, one column per tree shape), OUTPUT/results.json and "
                    "OUTPUT/accept_lengths.png (histograms of accept lengths).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--target", required=True, metavar="DIR", help="the target model (directory or Hub id)")
    p.add_argument("--draft", required=True, metavar="DIR", help="the EAGLE-3 head (directory or Hub id)")
    p.add_argument("--knobs", type=knob_triple, nargs="+", default=[(3, 1, 4), (7, 10, 60)], metavar="D,K,N",
                   help="tree shapes: num_steps,topk,num_draft_tokens (default: 3,1,4 7,10,60)")
    p.add_argument("--bench", nargs="+", default=None, metavar="NAME",
                   help=f"benchmarks ({', '.join(BENCHMARKS)}; default: all of them, or only the --bench-file "
                        "names when some are given)")
    p.add_argument("--bench-dir", metavar="DIR", default=None,
                   help="directory of NAME.jsonl prompt files (e.g. ../shared/data/bench); benchmarks without a "
                        "file are read from the Hugging Face Hub (needs network and the datasets package)")
    p.add_argument("--bench-file", type=bench_file, action="append", default=[], metavar="NAME=FILE",
                   help="a prompt file for one benchmark (repeatable)")
    p.add_argument("--num-prompts", type=positive_int, default=None, metavar="N", help="first N prompts each")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens generated per prompt at most")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts generated together")
    add_sampling_options(p)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the tokenizer's chat template (default: when it has one)")
    p.add_argument("--speed", action="store_true", help="also run plain decoding and report tokens/s and speedups")
    add_runtime_options(p)
    add_head_overrides(p)
    p.add_argument("--output", required=True, metavar="DIR",
                   help="where the table, JSON and PNG go: a new or empty directory (or an earlier report with "
                        "--overwrite); checked before any work")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier report in --output")
    p.add_argument("--json", action="store_true", help="print the results JSON (without per-step lists)")
    p.set_defaults(func=run)


def run(args) -> int:
    from eagle3_jax.decoding.tree import TreeSpec
    from eagle3_jax.evaluation import (
        BENCHMARKS,
        check_report_destination,
        evaluate,
        load_benchmarks,
        markdown_table,
        write_report,
    )
    from eagle3_jax.loading import load_draft, load_target
    from eagle3_jax.sampling import SamplingParams

    for knobs in args.knobs:
        TreeSpec(*knobs)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    check_report_destination(args.output, overwrite=args.overwrite)  # before hours of work, not after
    overrides = head_overrides(args)
    model_dir, _, draft_dir, _ = check_configs(args.target, args.draft, **overrides)
    files = dict(args.bench_file)
    names = args.bench or (list(files) if files else list(BENCHMARKS))
    benchmarks = load_benchmarks(names, files=files, bench_dir=args.bench_dir, limit=args.num_prompts)
    tokenizer = load_tokenizer(model_dir, required=True)
    target = load_target(model_dir, dtype=args.dtype, progress=not args.json, check_finite=args.check_finite)
    draft = load_draft(draft_dir, target.config, dtype=args.dtype, progress=not args.json,
                       check_finite=args.check_finite, **overrides)
    results = evaluate(target, draft, tokenizer, benchmarks, args.knobs, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, sampling=sampling, seed=args.seed, measure_plain=args.speed,
                       use_chat=args.chat, max_cache_len=args.max_cache_len, progress=not args.json)
    paths = write_report(results, args.output, overwrite=args.overwrite)
    if args.json:
        slim = {**results, "benchmarks": {b: {k: {kk: vv for kk, vv in v.items() if kk != "accept_lengths"}
                                              for k, v in row.items()} for b, row in results["benchmarks"].items()}}
        print(json.dumps({**slim, "files": paths}))
    else:
        print(markdown_table(results), end="")
        print(f"wrote {paths['markdown']}, {paths['json']}, {paths['png']}", file=sys.stderr)
    return 0
