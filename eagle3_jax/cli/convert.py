"""``eagle3-jax convert``: HF checkpoints to the orbax format, GGUF files to HF directories."""

from __future__ import annotations

import json

from eagle3_jax.cli.options import HelpFormatter, add_renamed

DTYPE_CHOICES = ["keep", "float32", "bfloat16", "float16"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an HF checkpoint to the orbax format, or a GGUF file to an HF directory",
        description="Convert a Hugging Face Qwen3, Qwen2 or Llama checkpoint or an EAGLE-3 draft head into "
                    "a directory of Flax parameters saved with orbax-checkpoint, plus its config and tokenizer files; "
                    "or, with --gguf, a llama.cpp GGUF file (llama, qwen2, qwen3) into an HF checkpoint directory "
                    "(config, dequantized safetensors, tokenizer and chat template) that every eagle3-jax command "
                    "and transformers load. The output is written atomically: on any error nothing is left behind.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("source", metavar="SRC", help="HF model directory or Hub id; with --gguf, a .gguf file")
    p.add_argument("output", metavar="DST", help="output directory (must not exist unless --overwrite)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--head", action="store_true",
                      help="SRC is an EAGLE-3 draft head (LlamaForCausalLMEagle3), not a target")
    add_renamed(p, "--draft", "--head (SRC is a draft head; elsewhere --draft DIR names the head to decode with)")
    kind.add_argument("--gguf", action="store_true",
                      help="SRC is a GGUF file: dequantize it into an HF directory (no orbax)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep",
                   help="stored parameter dtype; keep: the checkpoint's own (config.json's torch_dtype; for GGUF, "
                        "float32 for F32 and quantized tensors, float16/bfloat16 for F16/BF16 ones)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted directory")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.gguf:
        from eagle3_jax.weights.gguf_io import convert_gguf

        summary = convert_gguf(args.source, args.output, dtype=args.dtype, overwrite=args.overwrite,
                               progress=not args.json)
        summary["kind"] = "target"
        if args.json:
            print(json.dumps(summary))
        else:
            types = ", ".join(f"{n} {t}" for t, n in sorted(summary["gguf_types"].items()))
            print(f"converted {args.source} ({summary['architecture']}, {summary['parameters'] / 1e6:.1f}M "
                  f"parameters; tensors: {types}) -> {summary['output']}, stored as "
                  f"{', '.join(summary['stored_dtypes'])}")
        return 0
    from eagle3_jax.loading import convert_draft, convert_target
    from eagle3_jax.weights.converted import read_marker

    convert = convert_draft if args.head else convert_target
    out = convert(args.source, args.output, dtype=args.dtype, overwrite=args.overwrite, progress=not args.json)
    dtype = read_marker(out).get("dtype")
    if args.json:
        print(json.dumps({"output": out, "kind": "draft" if args.head else "target", "dtype": dtype}))
    else:
        print(f"converted {args.source} -> {out}, stored as {dtype}")
    return 0
