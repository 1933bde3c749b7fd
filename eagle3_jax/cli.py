"""The ``eagle3-jax`` command line.

Every user error (bad option, missing file, broken checkpoint, prompt too
long) ends with a one-line ``error: ...`` on stderr and a non-zero exit, never a
traceback. ``--json`` prints one JSON object per prompt on stdout, for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

EXIT_ERROR = 1
EXIT_USAGE = 2


def _int_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with a target model",
        description="Generate continuations of one or more prompts with a Qwen3/Qwen2 target. "
                    "Several --prompt (or --prompt-ids) options form one batch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 means greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="PRNG seed for sampling")
    p.add_argument("--max-cache-len", type=_positive_int, default=None, metavar="S",
                   help="KV cache slots per prompt (default: prompt bucket + max-new-tokens, rounded up to 128)")
    p.add_argument("--stop-ids", type=_int_list, default=None, metavar="IDS",
                   help="comma-separated token ids that end generation (default: the model's eos ids)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at eos; generate max-new-tokens")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="parameter/activation dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    p.set_defaults(func=_cmd_generate)


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an HF checkpoint to the faster-loading orbax format",
        description="Convert a Hugging Face Qwen3/Qwen2 checkpoint or an EAGLE-3 draft head (safetensors) into "
                    "a directory of Flax parameters saved with orbax-checkpoint, plus its config and tokenizer files. "
                    "The output is written atomically: on any error nothing is left behind.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
        help="offline end-to-end run on a built-in model (no download)",
        description="Run the jit-compiled decode loop end to end on a small built-in model, offline, and print "
                    "what it produced and how fast. (For now the built-in model has random weights.)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N", help="tokens per prompt")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from eagle3_jax.demo import run_demo

    figures = run_demo(max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"model:    {figures['model']} on {figures['backend']}")
        print(f"batch:    {figures['batch']} prompts, {figures['new_tokens_per_prompt']} new tokens")
        print(f"tokens:   {figures['first_tokens']} ...")
        print(f"compile:  {figures['compile_seconds']:.1f} s (once; the second call reused it: "
              f"{not figures['recompiled_on_second_call']})")
        print(f"speed:    {figures['tokens_per_second_per_prompt']:.0f} tok/s per prompt "
              f"(prefill {figures['prefill_seconds'] * 1e3:.1f} ms, loop {figures['decode_seconds'] * 1e3:.1f} ms)")
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
    _add_demo(sub)
    return parser


def _load_tokenizer(model_dir: str, required: bool):
    has_files = any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    if not has_files:
        if required:
            from eagle3_jax.errors import InputError

            raise InputError(f"{model_dir} has no tokenizer files; pass --prompt-ids instead of --prompt")
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        from eagle3_jax.errors import InputError

        if not getattr(tokenizer, "chat_template", None):
            raise InputError("--chat: the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _cmd_generate(args) -> int:
    from eagle3_jax.config import Qwen3Config
    from eagle3_jax.generation import Generator, plan_batch
    from eagle3_jax.hub import resolve_model_dir
    from eagle3_jax.loading import load_target, parse_dtype
    from eagle3_jax.sampling import SamplingParams

    if args.chat and not args.prompt:
        raise _usage("--chat needs --prompt")
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    model_dir = resolve_model_dir(args.target)
    tokenizer = _load_tokenizer(model_dir, required=bool(args.prompt))
    prompts = [_encode(tokenizer, t, args.chat) for t in args.prompt] if args.prompt else args.prompt_ids
    stops = () if args.no_stop else args.stop_ids
    # Reject bad input from the config alone, before any weights are read.
    plan_batch(Qwen3Config.from_pretrained(model_dir), prompts, max_new_tokens=args.max_new_tokens,
               sampling=sampling, stop_token_ids=stops, max_cache_len=args.max_cache_len,
               cache_dtype=parse_dtype(args.dtype))
    target = load_target(model_dir, dtype=args.dtype, progress=not args.json)
    outputs = Generator(target, max_cache_len=args.max_cache_len).generate(
        prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed, stop_token_ids=stops)
    for i, out in enumerate(outputs):
        text = tokenizer.decode(out.token_ids, skip_special_tokens=True) if tokenizer is not None else None
        if args.json:
            print(json.dumps({"prompt_index": i, "text": text, **out.to_json()}), flush=True)
        else:
            print(text if text is not None else ",".join(map(str, out.token_ids)), flush=True)
            print(f"[{len(out.token_ids)} tokens, finish={out.finish_reason}, "
                  f"{out.tokens_per_second:.1f} tok/s, forwards={out.num_target_forwards}, "
                  f"compile {out.compile_seconds:.1f}s]", file=sys.stderr)
    return 0


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
        parser.error(str(e))
    except Eagle3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
