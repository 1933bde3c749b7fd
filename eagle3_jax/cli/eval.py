"""``eagle3-jax eval``: acceptance length per benchmark and tree shape."""

from __future__ import annotations

import argparse
import json
import sys

from eagle3_jax.cli.options import (
    EXIT_INTERNAL,
    HelpFormatter,
    add_head_overrides,
    add_mesh_options,
    add_runtime_options,
    add_sampling_options,
    bench_file,
    check_configs,
    head_overrides,
    is_main_process,
    knob_triple,
    load_tokenizer,
    mesh_from_args,
    positive_int,
    start_distributed,
)
from eagle3_jax.defaults import DEFAULT_MAX_NEW_TOKENS


def add_parser(sub) -> None:
    from eagle3_jax.bench_prompts import BENCHMARKS

    p = sub.add_parser(
        "eval",
        help="acceptance length per benchmark for a target, a head and tree shapes",
        description="Generate the prompts of each benchmark with speculative decoding for each tree shape and "
                    "report the acceptance length (generated tokens / verify forwards) as the model cards do. "
                    "Prompts of a benchmark come from --bench-file NAME=FILE, else --bench-dir/NAME.jsonl, else "
                    "the slice shipped with eagle3-jax (the first prompts of gsm8k, humaneval, math500 and "
                    "mtbench), else the Hugging Face Hub (online, with the datasets package); a benchmark no "
                    "source has is skipped and named. Writes OUTPUT/results.md (a table, one column per tree "
                    "shape), OUTPUT/results.json (with the generated tokens of every prompt) and "
                    "OUTPUT/accept_lengths.png (histograms of accept lengths). With --speed, plain decoding and "
                    "the tree shapes run interleaved batch by batch, --repeats times, and the speedup is the "
                    "median with its spread; greedy speculative tokens are checked against plain decoding's "
                    "(a difference is a bug: the report is written and the exit status is 3).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--target", required=True, metavar="DIR", help="the target model (directory or Hub id)")
    p.add_argument("--draft", required=True, metavar="DIR", help="the EAGLE-3 head (directory or Hub id)")
    p.add_argument("--knobs", type=knob_triple, nargs="+", default=None, metavar="D,K,N",
                   help="tree shapes: num_steps,topk,num_draft_tokens (default: 3,1,4 7,10,60)")
    p.add_argument("--bench", nargs="+", default=None, metavar="NAME",
                   help=f"benchmarks ({', '.join(BENCHMARKS)}; default: all of them, or only the --bench-file "
                        "names when some are given); those no source has are skipped with a warning")
    p.add_argument("--bench-dir", metavar="DIR", default=None,
                   help="directory of NAME.jsonl prompt files (the full sets); a benchmark without a file here "
                        "uses the shipped slice, else the Hugging Face Hub when online (a benchmark of another name "
                        "needs --bench-file NAME=FILE)")
    p.add_argument("--bench-file", type=bench_file, action="append", default=[], metavar="NAME=FILE",
                   help="a prompt file for one benchmark (repeatable)")
    p.add_argument("--num-prompts", type=positive_int, default=None, metavar="N", help="first N prompts each")
    p.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="tokens generated per prompt at most")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts generated together")
    add_sampling_options(p)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the tokenizer's chat template (default: when it has one)")
    p.add_argument("--speed", action="store_true",
                   help="also run plain decoding, interleaved with the tree shapes, and report tokens/s and "
                        "speedups (median and spread over --repeats)")
    p.add_argument("--repeats", type=positive_int, default=3, metavar="R",
                   help="with --speed: timed repeats of every batch per method, after one untimed (compiling) run")
    add_runtime_options(p)
    add_mesh_options(p)
    add_head_overrides(p)
    p.add_argument("--output", required=True, metavar="DIR",
                   help="where the table, JSON and PNG go: a new or empty directory (or an earlier report with "
                        "--overwrite); checked before any work")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier report in --output")
    p.add_argument("--json", action="store_true",
                   help="print the results JSON (without the per-step accept lengths and per-prompt tokens)")
    p.set_defaults(func=run)


def run(args) -> int:
    from eagle3_jax.decoding.tree import DEFAULT_TREE, WIDE_TREE, TreeSpec
    from eagle3_jax.eval_report import (
        check_report_destination,
        greedy_mismatches,
        markdown_table,
        model_name,
        slim_results,
        write_report,
    )
    from eagle3_jax.evaluation import run_evaluation
    from eagle3_jax.loading import load_draft, load_target
    from eagle3_jax.sampling import SamplingParams

    knob_list = [TreeSpec.resolve(*knobs).knobs for knobs in args.knobs or (DEFAULT_TREE, WIDE_TREE)]
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    check_report_destination(args.output, overwrite=args.overwrite)  # before hours of work, not after
    overrides = head_overrides(args)
    model_dir, target_config, draft_dir, _ = check_configs(args.target, args.draft, **overrides)
    start_distributed(args)
    mesh = mesh_from_args(args, target_config)
    main = is_main_process()
    benchmarks = find_prompts(args)
    tokenizer = load_tokenizer(model_dir, required=True)
    progress = main and not args.json
    target = load_target(model_dir, dtype=args.dtype, progress=progress, check_finite=args.check_finite, mesh=mesh)
    draft = load_draft(draft_dir, target.config, dtype=args.dtype, progress=progress,
                       check_finite=args.check_finite, mesh=mesh, **overrides)
    records = run_evaluation(target, draft, tokenizer, benchmarks, knob_list, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, sampling=sampling, seed=args.seed, measure_plain=args.speed,
                             repeats=args.repeats, use_chat=args.chat, max_cache_len=args.max_cache_len,
                             attention=args.attention, mesh=mesh,
                             progress=progress, target_name=model_name(args.target),
                             draft_name=model_name(args.draft))
    if not main:  # the other processes of a --distributed run computed the same results
        return 0
    results = records.to_json()  # what results.json holds: rendered once for the report, the table and --json
    paths = write_report(results, args.output, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({**slim_results(results), "files": paths}))
    else:
        print(markdown_table(results), end="")
        print(f"wrote {paths['markdown']}, {paths['json']}, {paths['png']}", file=sys.stderr)
    exact = str(target.dtype) == "float32"
    return report_mismatches(greedy_mismatches(results), exact=exact)


def find_prompts(args):
    """The prompts of the benchmarks asked for; warns on stderr about the skipped ones, fails if none is left."""
    from eagle3_jax.bench_prompts import BENCHMARKS, find_benchmarks
    from eagle3_jax.errors import InputError

    files = dict(args.bench_file)
    names = args.bench or (list(files) if files else list(BENCHMARKS))
    found = find_benchmarks(names, files=files, bench_dir=args.bench_dir, limit=args.num_prompts)
    for note in found.notes:
        print(f"note: {note}", file=sys.stderr)
    if not found.prompts:
        raise InputError("no benchmark has prompts:\n" + "\n".join(f"  {n}: {r}" for n, r in found.skipped.items()))
    for name, reason in found.skipped.items():
        print(f"warning: skipping {name}: {reason}", file=sys.stderr)
    return found


def report_mismatches(lines: list[str], exact: bool = True) -> int:
    """Reports greedy speculative tokens that differ from plain decoding's; returns the exit status.

    In float32 (``exact``) a difference is a bug: a loud message and exit
    status 3. In bfloat16 the tree's verify forward and the plain decode
    step multiply matrices of different shapes, so a near-tie between two
    tokens can round either way: a warning, exit status 0.
    """
    if not lines:
        return 0
    if not exact:
        print("warning: greedy speculative decoding produced different tokens from plain decoding; in bfloat16 a "
              "near-tie between two tokens can round differently in the tree's verify forward and in a plain decode "
              "step. Run with --dtype float32 to check (there they must be identical):", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
        return 0
    print("ERROR: greedy speculative decoding produced different tokens from plain decoding; this is a bug in "
          "eagle3-jax, please report it (the report was written, with the tokens of both):", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)
    return EXIT_INTERNAL
