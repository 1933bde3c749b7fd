"""``eagle3-jax compile``: compile every program for a chip you do not have, and say whether it fits."""

from __future__ import annotations

import json
import sys

from eagle3_jax.cli.options import HelpFormatter, knob_triple, positive_int

PROGRAM_NAMES = ("prefill", "plain-loop", "speculative-prefill", "speculative-loop", "server-prefill", "server-loop")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compile",
        help="compile the programs for a TPU topology or this CPU and report memory per chip (no weights read)",
        description="Compile the prefills, the plain and speculative loops and the server's programs for a named "
                    "topology, from abstract weights (nothing is read or allocated), and print per program and per "
                    "chip the bytes of arguments (weights, caches), outputs, aliased (donated) buffers and "
                    "temporaries, whether they fit the chip's memory, and the compile time. TPU topologies "
                    "(v4, v5e, v5p, v6e: e.g. v5e:1x1, v5e:2x2, v6e:2x4, v5p:2x2x1) are compiled by the real TPU "
                    "compiler through libtpu on any machine (pip install 'jax[tpu]'); 'cpu' compiles for this "
                    "machine. Answers 'does Qwen3-4B with a 32k cache fit one v5e chip?' before renting one.",
        formatter_class=HelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="a model shape: qwen3-0.6b, qwen3-4b, qwen3-8b, qwen3-32b "
                                                    "(default qwen3-4b)")
    src.add_argument("--config", metavar="DIR", default=None,
                     help="a model directory (or its config.json): its shape, no weights read")
    p.add_argument("--topology", default="v5e:1x1",
                   help="a TPU topology CHIP:AxB[xC] (v4, v5e, v5p, v6e), cpu (this CPU), or local (this "
                        "machine's default devices, e.g. its GPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights and KV cache")
    p.add_argument("--cache", type=positive_int, default=8192, metavar="SLOTS", help="KV slots per row")
    p.add_argument("--batch", type=positive_int, default=1, help="rows of the library's programs")
    p.add_argument("--server-batch", type=positive_int, default=None, metavar="ROWS",
                   help="rows of the server's loop (default --batch)")
    p.add_argument("--prompt-bucket", type=positive_int, default=128, metavar="TOKENS",
                   help="the prefills' padded prompt length")
    p.add_argument("--knobs", type=knob_triple, default=(3, 1, 4), metavar="D,K,N",
                   help="the speculative tree num_steps,topk,num_draft_tokens")
    p.add_argument("--draft-vocab", type=positive_int, default=32000, metavar="N",
                   help="the draft head's vocabulary (a head of the target's shape)")
    p.add_argument("--tensor-parallel", type=positive_int, default=1, metavar="N", help="chips per tensor group")
    p.add_argument("--data-parallel", type=positive_int, default=1, metavar="M", help="tensor groups over the batch")
    p.add_argument("--programs", nargs="+", choices=PROGRAM_NAMES, default=list(PROGRAM_NAMES), metavar="NAME",
                   help=f"the programs to compile: {', '.join(PROGRAM_NAMES)}")
    p.add_argument("--attention", default="auto", help="attention backend (auto: the topology platform's default)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)


def format_report(result: dict) -> str:
    gib = 1 << 30
    setup = result["setup"]
    lines = [f"{setup['model']} {setup['dtype']} on {setup['topology']} ({setup['chips']} chip(s) used, mesh "
             f"{setup['data_parallel']}x{setup['tensor_parallel']} data x tensor), cache {setup['cache']}, batch "
             f"{setup['batch']} (server {setup['server_batch']}), prompt bucket {setup['prompt_bucket']}, tree "
             f"{','.join(map(str, setup['knobs']))}, draft vocabulary {setup['draft_vocab']}",
             "memory per chip in GiB" + (f" (chip memory {setup['chip_memory_bytes'] / gib:.2f})"
                                         if setup["chip_memory_bytes"] else ""),
             "| program | arguments | outputs | aliased | temporaries | total | fits | compile s |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in result["programs"]:
        if r["error"]:
            lines.append(f"| {r['program']} | | | | | | no: {r['error']} | |")
            continue
        fits = {True: "yes", False: "no", None: "?"}[r["fits"]]
        lines.append(f"| {r['program']} | {r['argument_bytes'] / gib:.2f} | {r['output_bytes'] / gib:.2f} | "
                     f"{r['alias_bytes'] / gib:.2f} | {r['temp_bytes'] / gib:.2f} | {r['total_bytes'] / gib:.2f} | "
                     f"{fits} | {r['compile_seconds']:.0f} |")
    return "\n".join(lines)


def run(args) -> int:
    import jax.numpy as jnp

    from eagle3_jax.aot import PRESETS, compile_report, topology
    from eagle3_jax.cli.options import usage
    from eagle3_jax.errors import InputError

    if args.config is not None:
        from eagle3_jax.models.registry import read_target_config

        config, model = read_target_config(args.config), args.config
    else:
        model = args.preset or "qwen3-4b"
        if model not in PRESETS:
            raise usage(f"unknown preset {model!r}; choose from {', '.join(PRESETS)}")
        config = PRESETS[model]()
    topo = topology(args.topology)
    if args.tensor_parallel * args.data_parallel > len(topo.devices):
        raise InputError(f"--data-parallel {args.data_parallel} x --tensor-parallel {args.tensor_parallel} needs "
                         f"{args.tensor_parallel * args.data_parallel} chips; {args.topology} has {len(topo.devices)}")
    reports = compile_report(
        config, topo, dtype=jnp.dtype(args.dtype), capacity=args.cache, batch=args.batch,
        prompt_bucket=args.prompt_bucket, tree=tuple(args.knobs), draft_vocab=args.draft_vocab,
        tensor_parallel=args.tensor_parallel, data_parallel=args.data_parallel, server_batch=args.server_batch,
        attention=args.attention, programs=[n.replace("-", " ") for n in args.programs],
        log=lambda line: print(line, file=sys.stderr, flush=True))
    result = {"setup": {"model": model, "dtype": args.dtype, "topology": topo.name, "chip": topo.chip,
                        "chips": args.tensor_parallel * args.data_parallel, "chip_memory_bytes": topo.memory_bytes,
                        "cache": args.cache, "batch": args.batch, "server_batch": args.server_batch or args.batch,
                        "prompt_bucket": args.prompt_bucket, "knobs": list(args.knobs),
                        "draft_vocab": args.draft_vocab, "tensor_parallel": args.tensor_parallel,
                        "data_parallel": args.data_parallel, "attention": args.attention},
              "programs": [r.to_json() for r in reports]}
    print(json.dumps(result) if args.json else format_report(result))
    return 0 if all(r.error is None for r in reports) else 1
