"""``eagle3-jax convert``: HF safetensors checkpoints to the orbax format."""

from __future__ import annotations

import json

from eagle3_jax.cli.options import HelpFormatter


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an HF checkpoint to the faster-loading orbax format",
        description="Convert a Hugging Face Qwen3, Qwen2 or Llama checkpoint or an EAGLE-3 draft head into "
                    "a directory of Flax parameters saved with orbax-checkpoint, plus its config and tokenizer files. "
                    "The output is written atomically: on any error nothing is left behind.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("source", metavar="SRC", help="HF model directory or Hub id")
    p.add_argument("--draft", action="store_true",
                   help="SRC is an EAGLE-3 draft head (LlamaForCausalLMEagle3), not a target")
    p.add_argument("output", metavar="DST", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="stored parameter dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted directory")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from eagle3_jax.loading import convert_draft, convert_target

    convert = convert_draft if args.draft else convert_target
    out = convert(args.source, args.output, dtype=args.dtype, overwrite=args.overwrite, progress=not args.json)
    if args.json:
        print(json.dumps({"output": out, "kind": "draft" if args.draft else "target", "dtype": args.dtype}))
    else:
        print(f"converted {args.source} -> {out}")
    return 0
