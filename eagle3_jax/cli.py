"""The ``eagle3-jax`` command line.

Every user error (bad option, missing file, broken checkpoint, prompt too
long) ends with a one-line ``error: ...`` on stderr and a non-zero exit, never a
traceback: 1 for bad input or a failing environment (disk, memory), 2 for a
bad command line, 3 for an exception the project did not anticipate (a bug;
``EAGLE3_JAX_DEBUG=1`` shows its traceback). ``--json`` prints one JSON object per prompt on stdout, for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from eagle3_jax.checks import MAX_SEED

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3  # a bug: an exception the project did not anticipate


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: not when it is None or False, nor when the help already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS \
                or "default" in text or not text:
            return text
        return super()._get_help_string(action)


def _int_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _int_type(what: str, minimum: int, maximum: int | None = None):
    """An argparse type for integers in [minimum, maximum], described as ``what`` in its errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_type("a positive integer", 1)
_non_negative_int = _int_type("a non-negative integer", 0)
_seed = _int_type(f"an integer seed in [0, {MAX_SEED}]", 0, MAX_SEED)


def _finite_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _add_sampling_options(p) -> None:
    """--temperature, --top-p, --top-k and --seed: the sampling knobs of every generating command."""
    p.add_argument("--temperature", type=_finite_float, default=0.0, metavar="T",
                   help="sampling temperature; 0 means greedy decoding")
    p.add_argument("--top-p", type=_finite_float, default=1.0, metavar="P", help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=_non_negative_int, default=0, metavar="K",
                   help="sample among the K most likely tokens (0 = off)")
    p.add_argument("--seed", type=_seed, default=0, metavar="S", help="PRNG seed for sampling (0 to 2**32-1)")


def _add_runtime_options(p) -> None:
    """--max-cache-len and --dtype."""
    p.add_argument("--max-cache-len", type=_positive_int, default=None, metavar="S",
                   help="KV cache slots per prompt (default: prompt bucket + max-new-tokens, rounded up to 128)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="parameter/activation dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--no-check-finite", dest="check_finite", action="store_false",
                   help="load weights that hold NaN or Inf instead of refusing them (generation still stops a row "
                        "on non-finite logits, with finish_reason 'nonfinite')")


def _add_tree_options(p) -> None:
    """--num-steps, --topk, --num-draft-tokens: the static tree shape (SGLang's knobs)."""
    p.add_argument("--num-steps", type=_positive_int, default=None, metavar="D",
                   help="tree depth: draft steps per cycle (default 3)")
    p.add_argument("--topk", type=_positive_int, default=None, metavar="K",
                   help="children kept per tree node and beam width (default 1: a chain)")
    p.add_argument("--num-draft-tokens", type=_positive_int, default=None, metavar="N",
                   help="tree tokens verified per cycle, root included (default D+1 for a chain; required for K>1)")


def _add_head_overrides(p) -> None:
    """--draft-rope-theta and --feature-layers: the pitfalls of published heads."""
    p.add_argument("--draft-rope-theta", type=_finite_float, default=None, metavar="THETA",
                   help="override the head's RoPE base (some published heads were trained with 10000)")
    p.add_argument("--feature-layers", type=_int_list, default=None, metavar="L1,L2,L3",
                   help="override the target layers feeding the head (HF hidden_states indices, e.g. 2,18,33)")


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with a target model",
        description="Generate continuations of one or more prompts with a Qwen3/Qwen2 target. "
                    "Several --prompt (or --prompt-ids) options form one batch.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--target", required=True, metavar="DIR",
                   help="target model: an HF directory, a converted directory, or a Hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="prompt text, tokenized with the target's tokenizer (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", type=_int_list, metavar="IDS",
                     help="prompt as comma-separated token ids, no tokenizer needed (repeat for a batch)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each --prompt as a user turn with the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, metavar="N",
                   help="generated tokens per prompt at most")
    _add_sampling_options(p)
    p.add_argument("--stop-ids", type=_int_list, default=None, metavar="IDS",
                   help="comma-separated token ids that end generation (default: the model's eos ids)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at eos; generate max-new-tokens")
    _add_runtime_options(p)
    spec = p.add_argument_group("speculative decoding (EAGLE-3)")
    spec.add_argument("--draft", metavar="DIR", default=None,
                      help="EAGLE-3 draft head (SpecForge/SGLang format or converted); enables speculative decoding")
    _add_tree_options(spec)
    _add_head_overrides(spec)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they are committed (default: on for one prompt without --json)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt instead of text (with accept_lengths and acceptance_length)")
    p.set_defaults(func=_cmd_generate)


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an HF checkpoint to the faster-loading orbax format",
        description="Convert a Hugging Face Qwen3/Qwen2 checkpoint or an EAGLE-3 draft head (safetensors) into "
                    "a directory of Flax parameters saved with orbax-checkpoint, plus its config and tokenizer files. "
                    "The output is written atomically: on any error nothing is left behind.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("source", metavar="SRC", help="HF model directory or Hub id")
    p.add_argument("--draft", action="store_true",
                   help="SRC is an EAGLE-3 draft head (LlamaForCausalLMEagle3), not a target")
    p.add_argument("output", metavar="DST", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="stored parameter dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted directory")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_convert)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="offline speculative decoding on the embedded demo pair",
        description="Load the embedded demo pair (a small Qwen3-architecture code model trained on the CPython "
                    "standard library, and its EAGLE-3 head trained with 'eagle3-jax train'), complete a code "
                    "prompt with speculative decoding, and print the text, the acceptance length and the "
                    "speedup over plain decoding measured in the same run. Needs no network.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--prompt", default=None, help="code to complete (default: a function header)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, metavar="N", help="tokens to generate")
    p.add_argument("--knobs", type=_knob_triple, default=None, metavar="D,K,N",
                   help="tree shape num_steps,topk,num_draft_tokens (default 4,1,5)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from eagle3_jax.decoding.tree import TreeSpec
    from eagle3_jax.demo.run import DEFAULT_KNOBS, DEFAULT_PROMPT, run_demo

    knobs = args.knobs or DEFAULT_KNOBS
    TreeSpec(*knobs)
    if args.prompt is not None:
        _check_text(args.prompt, "--prompt")
    figures = run_demo(args.prompt or DEFAULT_PROMPT, max_new_tokens=args.max_new_tokens, knobs=knobs)
    if args.json:
        print(json.dumps(figures))
        return 0
    print(figures["prompt"] + figures["completion"])
    print("-" * 60)
    print(f"speculative decoding, tree {tuple(figures['knobs'])}: acceptance length "
          f"{figures['acceptance_length']:.2f} tokens per target forward")
    print(f"plain {figures['plain_tokens_per_second']:.1f} tok/s, speculative "
          f"{figures['speculative_tokens_per_second']:.1f} tok/s: speedup {figures['speedup']:.2f}x "
          f"(same tokens as plain greedy decoding)")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an EAGLE-3 draft head for a target",
        description="Train an EAGLE-3 draft head against a frozen target with the training-time test "
                    "(SpecForge's objective), and export it in the SpecForge/SGLang/vLLM format to OUTPUT/head. "
                    "OUTPUT (a new or empty directory, checked before any work) also holds run.json (the job), "
                    "checkpoints/ (resume with --resume), metrics.jsonl (one JSON line per step: loss, per-TTT-step "
                    "loss and accuracy, learning rate, tokens/s), summary.json, teacher/ (with --precompute) and "
                    "corrupt-checkpoints/ (unreadable checkpoints a resume skipped, kept for inspection).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--target", required=True, metavar="DIR", help="the target model (directory or Hub id)")
    p.add_argument("--data", required=True, action="append", metavar="SRC",
                   help="training data, repeatable: JSONL conversations (OpenAI 'messages' or ShareGPT "
                        "'conversations'; loss on assistant replies; or {'text': ...} lines), plain text files "
                        "(loss on every token), directories of such files, or hf:NAME[:SPLIT] (needs the "
                        "datasets package)")
    p.add_argument("--output", required=True, metavar="DIR", help="the run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its newest readable checkpoint (from step 0 if it "
                        "stopped before its first one; a complete teacher/ is reused)")
    p.add_argument("--init-head", metavar="DIR", default=None,
                   help="start from this head (its vocabulary map is kept) instead of a new one")
    p.add_argument("--draft-vocab-size", type=_positive_int, default=32000,
                   help="draft vocabulary of a new head: the most frequent loss-masked target tokens")
    p.add_argument("--feature-layers", type=_int_list, default=None, metavar="L1,L2,L3",
                   help="target layers feeding a new head (HF hidden_states indices; default 2,L//2,L-3)")
    p.add_argument("--ttt-length", type=_positive_int, default=7, help="unrolled draft steps (training-time test)")
    p.add_argument("--max-length", type=_positive_int, default=2048, help="longest sequence (longer are truncated)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="sequences per step (a multiple of --devices)")
    p.add_argument("--epochs", type=_positive_int, default=1, help="passes over the data")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many steps (overrides epochs)")
    p.add_argument("--lr", type=_finite_float, default=1e-4, help="peak learning rate (AdamW, warmup then cosine decay)")
    p.add_argument("--warmup-ratio", type=_finite_float, default=0.015, help="fraction of steps for linear warmup")
    p.add_argument("--max-grad-norm", type=_finite_float, default=0.5, help="global gradient-norm clipping")
    p.add_argument("--weight-decay", type=_finite_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--compute-dtype", choices=["bfloat16", "float32"], default=None,
                   help="the draft's forward dtype; master weights stay float32 (default: bfloat16 on GPU/TPU, "
                        "float32 on CPU)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="the target's dtype")
    p.add_argument("--save-every", type=_positive_int, default=500, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=_positive_int, default=3, help="checkpoints kept")
    p.add_argument("--seed", type=_seed, default=0, help="data order and head initialisation (0 to 2**32-1)")
    p.add_argument("--precompute", action="store_true",
                   help="run the target once over the data, store its features and hidden states in "
                        "OUTPUT/teacher, and train from disk")
    p.add_argument("--devices", type=_positive_int, default=None,
                   help="data-parallel devices (default: all local devices)")
    p.add_argument("--no-export-embedding", action="store_true",
                   help="do not copy the target's embedding into the exported head")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    import jax

    from eagle3_jax.training.run import TrainJob, run_training
    from eagle3_jax.training.trainer import TrainConfig

    compute = args.compute_dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    cfg = TrainConfig(ttt_length=args.ttt_length, learning_rate=args.lr, warmup_ratio=args.warmup_ratio,
                      max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay, batch_size=args.batch_size,
                      max_length=args.max_length, epochs=args.epochs, max_steps=args.max_steps, seed=args.seed,
                      compute_dtype=compute, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints)
    job = TrainJob(target=args.target, data=args.data, output=args.output, config=cfg,
                   draft_vocab_size=args.draft_vocab_size, init_head=args.init_head,
                   feature_layers=tuple(args.feature_layers) if args.feature_layers else None,
                   precompute=args.precompute, resume=args.resume, devices=args.devices,
                   dtype=None if args.dtype == "auto" else args.dtype,
                   export_embedding=not args.no_export_embedding)
    summary = run_training(job, progress=not args.json)
    if args.json:
        print(json.dumps(summary))
    else:
        last = summary["last"] or {}
        accs = ", ".join(f"{a:.2f}" for a in last.get("acc_steps", []))
        print(f"trained {summary['steps']}/{summary['total_steps']} steps; last loss {last.get('loss', float('nan')):.4f}, "
              f"accuracy per TTT step [{accs}]")
        if summary.get("head"):
            print(f"head: {summary['head']}")
    return 0


def _add_regenerate(sub) -> None:
    p = sub.add_parser(
        "regenerate",
        help="answer training conversations with the target itself",
        description="Replace every assistant turn of JSONL conversations by the target's own reply (batched "
                    "generation), so that a head learns the target's distribution. Writes JSONL with 'messages'.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--target", required=True, metavar="DIR", help="the target model (directory or Hub id)")
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL conversations (OpenAI or ShareGPT)")
    p.add_argument("--output", required=True, metavar="FILE", help="the JSONL file to write (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N conversations")
    p.add_argument("--max-new-tokens", type=_positive_int, default=1024, help="tokens per reply at most")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="conversations generated together")
    _add_sampling_options(p)
    _add_runtime_options(p)
    spec = p.add_argument_group("speculative decoding (EAGLE-3)")
    spec.add_argument("--draft", metavar="DIR", default=None, help="speed generation up with an EAGLE-3 head")
    _add_tree_options(spec)
    p.set_defaults(func=_cmd_regenerate)


def _head_overrides(args) -> dict:
    """--draft-rope-theta and --feature-layers as the keyword arguments of ``with_overrides``/``load_draft``."""
    return dict(rope_theta=args.draft_rope_theta,
                feature_layers=tuple(args.feature_layers) if args.feature_layers else None)


def _check_configs(target: str, draft: str | None = None, **overrides):
    """Resolves and checks the target's (and the head's) config.json before any tokenizer or weights are read.

    Returns (target dir, target config, draft dir, draft config).
    """
    from eagle3_jax.config import Eagle3Config, Qwen3Config
    from eagle3_jax.hub import resolve_model_dir

    target_dir = resolve_model_dir(target)
    target_config = Qwen3Config.from_pretrained(target_dir)
    draft_dir = draft_config = None
    if draft is not None:
        draft_dir = resolve_model_dir(draft)
        draft_config = Eagle3Config.from_pretrained(draft_dir).with_overrides(**overrides)
        draft_config.check_target(target_config, where=f"draft head {draft_dir}")
    return target_dir, target_config, draft_dir, draft_config


def _cmd_regenerate(args) -> int:
    from eagle3_jax.atomic import atomic_file
    from eagle3_jax.generation import Generator
    from eagle3_jax.loading import load_draft, load_target
    from eagle3_jax.sampling import SamplingParams
    from eagle3_jax.training.data import read_conversations
    from eagle3_jax.training.regenerate import regenerate, write_jsonl

    if args.draft is None and any(v is not None for v in (args.num_steps, args.topk, args.num_draft_tokens)):
        raise _usage("--num-steps/--topk/--num-draft-tokens need --draft")
    spec = _check_tree(args.num_steps, args.topk, args.num_draft_tokens) if args.draft is not None else None
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if os.path.exists(args.output) and os.path.exists(args.data) and os.path.samefile(args.output, args.data):
        from eagle3_jax.errors import InputError

        raise InputError(f"{args.output}: is also --data; write the regenerated conversations to another file")
    model_dir, _, draft_dir, _ = _check_configs(args.target, args.draft)
    # The output is checked (and its temporary file created) before hours of generation.
    with atomic_file(args.output, overwrite=args.overwrite) as tmp:
        conversations = read_conversations(args.data)[: args.limit]
        tokenizer = _load_tokenizer(model_dir, required=True)
        if not getattr(tokenizer, "chat_template", None):
            from eagle3_jax.errors import InputError

            raise InputError(f"{model_dir}: the tokenizer has no chat template, which regenerate needs to render "
                             "the conversations")
        target = load_target(model_dir, dtype=args.dtype, check_finite=args.check_finite)
        draft = (load_draft(draft_dir, target.config, dtype=args.dtype, check_finite=args.check_finite)
                 if draft_dir else None)
        gen = Generator(target, draft, num_steps=spec.num_steps if spec else None, topk=spec.topk if spec else None,
                        num_draft_tokens=spec.num_draft_tokens if spec else None, max_cache_len=args.max_cache_len)
        result = regenerate(gen, tokenizer, conversations, max_new_tokens=args.max_new_tokens, sampling=sampling,
                            batch_size=args.batch_size, seed=args.seed)
        write_jsonl(result, tmp)
    print(f"wrote {len(result)} conversations to {args.output}", file=sys.stderr)
    return 0


def _knob_triple(text: str) -> tuple[int, int, int]:
    try:
        d, k, n = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected num_steps,topk,num_draft_tokens (e.g. 3,1,4), got {text!r}") from None
    return d, k, n


def _bench_file(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {text!r}")
    return name, path


def _add_eval(sub) -> None:
    from eagle3_jax.evaluation import BENCHMARKS

    p = sub.add_parser(
        "eval",
        help="acceptance length per benchmark for a target, a head and tree shapes",
        description="Generate the prompts of each benchmark with speculative decoding for each tree shape and "
                    "report the acceptance length (generated tokens / verify forwards) as the model cards do. "
                    "Writes OUTPUT/results.md (a table, one column per tree shape), OUTPUT/results.json and "
                    "OUTPUT/accept_lengths.png (histograms of accept lengths).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--target", required=True, metavar="DIR", help="the target model (directory or Hub id)")
    p.add_argument("--draft", required=True, metavar="DIR", help="the EAGLE-3 head (directory or Hub id)")
    p.add_argument("--knobs", type=_knob_triple, nargs="+", default=[(3, 1, 4), (7, 10, 60)], metavar="D,K,N",
                   help="tree shapes: num_steps,topk,num_draft_tokens (default: 3,1,4 7,10,60)")
    p.add_argument("--bench", nargs="+", default=None, metavar="NAME",
                   help=f"benchmarks ({', '.join(BENCHMARKS)}; default: all of them, or only the --bench-file "
                        "names when some are given)")
    p.add_argument("--bench-dir", metavar="DIR", default=None,
                   help="directory of NAME.jsonl prompt files (e.g. ../shared/data/bench); benchmarks without a "
                        "file are read from the Hugging Face Hub (needs network and the datasets package)")
    p.add_argument("--bench-file", type=_bench_file, action="append", default=[], metavar="NAME=FILE",
                   help="a prompt file for one benchmark (repeatable)")
    p.add_argument("--num-prompts", type=_positive_int, default=None, metavar="N", help="first N prompts each")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, help="tokens generated per prompt at most")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="prompts generated together")
    _add_sampling_options(p)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the tokenizer's chat template (default: when it has one)")
    p.add_argument("--speed", action="store_true", help="also run plain decoding and report tokens/s and speedups")
    _add_runtime_options(p)
    _add_head_overrides(p)
    p.add_argument("--output", required=True, metavar="DIR",
                   help="where the table, JSON and PNG go: a new or empty directory (or an earlier report with "
                        "--overwrite); checked before any work")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier report in --output")
    p.add_argument("--json", action="store_true", help="print the results JSON (without per-step lists)")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from eagle3_jax.decoding.tree import TreeSpec
    from eagle3_jax.evaluation import (BENCHMARKS, check_report_destination, evaluate, load_benchmarks,
                                       markdown_table, write_report)
    from eagle3_jax.loading import load_draft, load_target
    from eagle3_jax.sampling import SamplingParams

    for knobs in args.knobs:
        TreeSpec(*knobs)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    check_report_destination(args.output, overwrite=args.overwrite)  # before hours of work, not after
    overrides = _head_overrides(args)
    model_dir, _, draft_dir, _ = _check_configs(args.target, args.draft, **overrides)
    files = dict(args.bench_file)
    names = args.bench or (list(files) if files else list(BENCHMARKS))
    benchmarks = load_benchmarks(names, files=files, bench_dir=args.bench_dir, limit=args.num_prompts)
    tokenizer = _load_tokenizer(model_dir, required=True)
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


def build_parser() -> argparse.ArgumentParser:
    from eagle3_jax import __version__

    parser = argparse.ArgumentParser(
        prog="eagle3-jax",
        description="EAGLE-3 speculative decoding for Qwen3 in JAX. Run 'eagle3-jax COMMAND --help' for details.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate(sub)
    _add_convert(sub)
    _add_train(sub)
    _add_regenerate(sub)
    _add_eval(sub)
    _add_demo(sub)
    for subparser in sub.choices.values():  # usage errors found after parsing show the command's own usage
        subparser.set_defaults(_parser=subparser)
    return parser


def _end_progress_lines() -> None:
    """Closes progress bars still on screen, so that an error message starts on a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    bars = list(getattr(tqdm, "_instances", []))
    for bar in bars:
        bar.close()
    if bars:
        sys.stderr.write("\n")


def _load_tokenizer(model_dir: str, required: bool):
    """The model directory's tokenizer; None when it has none and ``required`` is off.

    A tokenizer that fails to load is an error when it is required (text
    prompts), else a warning: token ids are printed instead of text.
    """
    from eagle3_jax.errors import InputError

    has_files = any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    if not has_files:
        if required:
            raise InputError(f"{model_dir} has no tokenizer files; pass --prompt-ids instead of --prompt")
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # transformers and tokenizers raise anything from JSON, Rust and I/O errors
        reason = (str(e).strip().splitlines() or [""])[0][:200] or type(e).__name__
        message = f"{model_dir}: the tokenizer files could not be loaded ({type(e).__name__}: {reason})"
        if required:
            raise InputError(message + "; fix them, or pass --prompt-ids instead of --prompt") from None
        print(f"warning: {message}; printing token ids instead of text", file=sys.stderr)
        return None


def _check_text(text: str, what: str) -> str:
    """Text from the command line must be valid UTF-8 (undecodable bytes arrive as lone surrogates)."""
    from eagle3_jax.errors import InputError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid UTF-8 text (undecodable byte at position {e.start})") from None
    return text


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    from eagle3_jax.errors import InputError
    from eagle3_jax.text import render_chat, token_ids

    _check_text(text, "--prompt")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("--chat: the tokenizer has no chat template")
        text = render_chat(tokenizer, [{"role": "user", "content": text}], where="--chat")
    return token_ids(tokenizer, text, where="--prompt")


def _decode(tokenizer, token_ids: list[int]) -> str | None:
    if tokenizer is None:
        return None
    try:
        return tokenizer.decode(token_ids, skip_special_tokens=True)
    except Exception:  # a broken vocabulary: the ids are still printed
        return None


def _check_tree(steps, topk, num_draft_tokens):
    """The tree shape from --num-steps/--topk/--num-draft-tokens, with the CLI's defaults."""
    from eagle3_jax.decoding.tree import TreeSpec

    steps, topk = steps or 3, topk or 1
    if num_draft_tokens is None and topk > 1:
        raise _usage("--num-draft-tokens is required with --topk > 1")
    return TreeSpec(steps, topk, num_draft_tokens or steps + 1)


def _weights_bytes(config, dtype) -> int:
    """The bytes of a target's weights in ``dtype`` (for the memory check before loading)."""
    import numpy as np

    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    per_layer = attn + 3 * c.hidden_size * c.intermediate_size
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return (c.num_hidden_layers * per_layer + embed) * np.dtype(dtype).itemsize


def _cmd_generate(args) -> int:
    from eagle3_jax.generation import Generator, check_memory, plan_batch
    from eagle3_jax.loading import load_draft, load_target, parse_dtype
    from eagle3_jax.sampling import SamplingParams

    if args.chat and not args.prompt:
        raise _usage("--chat needs --prompt")
    if args.stream and args.json:
        raise _usage("--stream prints text; it can not be combined with --json")
    knobs = (args.num_steps, args.topk, args.num_draft_tokens, args.draft_rope_theta, args.feature_layers)
    if args.draft is None and any(k is not None for k in knobs):
        raise _usage("--num-steps/--topk/--num-draft-tokens/--draft-rope-theta/--feature-layers need --draft")
    spec = _check_tree(args.num_steps, args.topk, args.num_draft_tokens) if args.draft is not None else None
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    overrides = _head_overrides(args)
    model_dir, target_config, draft_dir, draft_config = _check_configs(args.target, args.draft, **overrides)
    tokenizer = _load_tokenizer(model_dir, required=bool(args.prompt))
    prompts = [_encode(tokenizer, t, args.chat) for t in args.prompt] if args.prompt else args.prompt_ids
    stops = () if args.no_stop else args.stop_ids
    dtype = parse_dtype(args.dtype)
    prompts, settings, _, bucket = plan_batch(
        target_config, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_token_ids=stops,
        max_cache_len=args.max_cache_len, cache_dtype=dtype)
    check_memory(target_config, settings, len(prompts), bucket, draft_config=draft_config, spec=spec,
                 weights_bytes=_weights_bytes(target_config, dtype))

    target = load_target(model_dir, dtype=args.dtype, progress=not args.json, check_finite=args.check_finite)
    draft = None
    if draft_dir is not None:
        draft = load_draft(draft_dir, target.config, dtype=args.dtype, progress=not args.json,
                           check_finite=args.check_finite, **overrides)
    gen = Generator(target, draft, num_steps=spec.num_steps if spec else None, topk=spec.topk if spec else None,
                    num_draft_tokens=spec.num_draft_tokens if spec else None, max_cache_len=args.max_cache_len)
    stream = args.stream if args.stream is not None else (len(prompts) == 1 and not args.json)
    printer = _StreamPrinter(tokenizer, len(prompts)) if stream else None
    outputs = gen.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                           stop_token_ids=stops, stream=printer)
    for i, out in enumerate(outputs):
        text = _decode(tokenizer, out.token_ids)
        if args.json:
            print(json.dumps({"prompt_index": i, "text": text, **out.to_json()}), flush=True)
            continue
        if printer is not None and i == 0:
            printer.finish()  # row 0 was streamed; the others print when done
        else:
            print(text if text is not None else ",".join(map(str, out.token_ids)), flush=True)
        spec_note = f", acceptance {out.acceptance_length:.2f}" if draft is not None else ""
        print(f"[{len(out.token_ids)} tokens, finish={out.finish_reason}, {out.tokens_per_second:.1f} tok/s, "
              f"forwards={out.num_target_forwards}{spec_note}, compile {out.compile_seconds:.1f}s]", file=sys.stderr)
    return _check_finite_outputs(outputs)


def _check_finite_outputs(outputs) -> int:
    """Exit status 1 with an error line when a row stopped on non-finite logits (broken weights or numerics)."""
    from eagle3_jax.generation import nonfinite_message

    message = nonfinite_message(outputs)
    if message is None:
        return 0
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


class _StreamPrinter:
    """Prints each row's tokens as they are committed (decoded text when a tokenizer is known)."""

    def __init__(self, tokenizer, rows: int):
        self.tokenizer = tokenizer
        self.tokens = [[] for _ in range(rows)]
        self.printed = [""] * rows

    def __call__(self, row: int, new_tokens: list[int]) -> None:
        self.tokens[row].extend(new_tokens)
        if self.tokenizer is None:
            sep = "," if self.printed[row] else ""
            chunk = sep + ",".join(map(str, new_tokens))
            self.printed[row] += chunk
        else:
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                return
            chunk, self.printed[row] = text[len(self.printed[row]):], text
        if row == 0:
            sys.stdout.write(chunk)
            sys.stdout.flush()

    def finish(self) -> None:
        if self.tokenizer is not None:
            text = self.tokenizer.decode(self.tokens[0], skip_special_tokens=True)
            sys.stdout.write(text[len(self.printed[0]):])
        sys.stdout.write("\n")
        sys.stdout.flush()


def _cmd_convert(args) -> int:
    from eagle3_jax.loading import convert_draft, convert_target

    convert = convert_draft if args.draft else convert_target
    out = convert(args.source, args.output, dtype=args.dtype, overwrite=args.overwrite, progress=not args.json)
    if args.json:
        print(json.dumps({"output": out, "kind": "draft" if args.draft else "target", "dtype": args.dtype}))
    else:
        print(f"converted {args.source} -> {out}")
    return 0


class _UsageError(Exception):
    pass


def _usage(message: str) -> _UsageError:
    return _UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from eagle3_jax.errors import Eagle3Error

    try:
        return args.func(args)
    except _UsageError as e:
        _end_progress_lines()
        (getattr(args, "_parser", None) or parser).error(str(e))
    except Eagle3Error as e:
        return _report(f"error: {e}", EXIT_ERROR)
    except KeyboardInterrupt:
        return _report("interrupted", 130)
    except MemoryError:
        return _report("error: out of host memory; lower --max-cache-len, --max-new-tokens or the batch size",
                       EXIT_ERROR)
    except OSError as e:  # the environment, not the input: a full disk, a permission, a vanished file
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _report(f"error: {where}{e.strerror or e}", EXIT_ERROR)
    except Exception as e:
        if os.environ.get("EAGLE3_JAX_DEBUG"):
            raise
        return _report(f"error: internal error ({type(e).__name__}: {str(e).strip()[:300]}); this is a bug in "
                       "eagle3-jax, please report it with the traceback that EAGLE3_JAX_DEBUG=1 shows", EXIT_INTERNAL)


def _report(line: str, code: int) -> int:
    """Prints ``line`` on stderr, on a line of its own, and returns the exit status ``code``."""
    _end_progress_lines()
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
