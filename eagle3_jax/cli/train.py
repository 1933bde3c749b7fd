"""``eagle3-jax train``: train an EAGLE-3 head."""

from __future__ import annotations

import json

from eagle3_jax.cli.options import (
    HelpFormatter,
    add_mesh_options,
    finite_float,
    int_list,
    positive_int,
    seed_type,
    start_distributed,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an EAGLE-3 draft head for a target",
        description="Train an EAGLE-3 draft head against a frozen target with the training-time test "
                    "(SpecForge's objective), and export it in the SpecForge/SGLang/vLLM format to OUTPUT/head. "
                    "OUTPUT (a new or empty directory, checked before any work) also holds run.json (the job), "
                    "checkpoints/ (resume with --resume), metrics.jsonl (one JSON line per step: loss, per-TTT-step "
                    "loss and accuracy, learning rate, tokens/s), summary.json, teacher/ (with --precompute) and "
                    "corrupt-checkpoints/ (unreadable checkpoints a resume skipped, kept for inspection).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--target", required=True, metavar="DIR", help="the target model (directory or Hub id)")
    p.add_argument("--data", required=True, action="append", metavar="SRC",
                   help="training data, repeatable: JSONL conversations (OpenAI 'messages' or ShareGPT "
                        "'conversations'; loss on assistant replies; or {'text': ...} lines), plain text files "
                        "(loss on every token), directories of such files, or hf:NAME[:SPLIT] (needs the "
                        "datasets package)")
    p.add_argument("--output", required=True, metavar="DIR", help="the run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its newest readable checkpoint (from step 0 if it "
                        "stopped before its first one; the precomputed teacher, complete or not, is kept)")
    p.add_argument("--init-head", metavar="DIR", default=None,
                   help="start from this head (its vocabulary map is kept) instead of a new one")
    p.add_argument("--draft-vocab-size", type=positive_int, default=32000,
                   help="draft vocabulary of a new head: the most frequent loss-masked target tokens")
    p.add_argument("--feature-layers", type=int_list, default=None, metavar="L1,L2,L3",
                   help="target layers feeding a new head (HF hidden_states indices; default 2,L//2,L-3)")
    p.add_argument("--ttt-length", type=positive_int, default=7, help="unrolled draft steps (training-time test)")
    p.add_argument("--max-length", type=positive_int, default=2048, help="longest sequence (longer are truncated)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="sequences per step (a multiple of --devices)")
    p.add_argument("--epochs", type=positive_int, default=1, help="passes over the data")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps (overrides epochs)")
    p.add_argument("--lr", type=finite_float, default=1e-4, help="peak learning rate (AdamW, warmup then cosine decay)")
    p.add_argument("--warmup-ratio", type=finite_float, default=0.015, help="fraction of steps for linear warmup")
    p.add_argument("--max-grad-norm", type=finite_float, default=0.5, help="global gradient-norm clipping")
    p.add_argument("--weight-decay", type=finite_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--compute-dtype", choices=["bfloat16", "float32"], default=None,
                   help="the draft's forward dtype; master weights stay float32 (default: bfloat16 on GPU/TPU, "
                        "float32 on CPU)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="the target's dtype")
    p.add_argument("--save-every", type=positive_int, default=500, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=positive_int, default=3, help="checkpoints kept")
    p.add_argument("--seed", type=seed_type, default=0, help="data order and head initialisation (0 to 2**32-1)")
    p.add_argument("--precompute", action="store_true",
                   help="run the target once over the data, store its features and hidden states in "
                        "OUTPUT/teacher, and train from disk (a stopped build resumes with --resume)")
    p.add_argument("--devices", type=positive_int, default=None,
                   help="data-parallel devices (default: all devices over --tensor-parallel)")
    p.add_argument("--no-export-embedding", action="store_true",
                   help="do not copy the target's embedding into the exported head")
    add_mesh_options(p, data_parallel=False)
    p.add_argument("--json", action="store_true",
                   help="print JSON lines on stdout instead of progress bars: one per training step as it "
                        "finishes, {\"event\": \"step\", \"step\": S, \"total_steps\": T, ...} with the "
                        "step's metrics.jsonl fields (epoch, loss, loss_steps, kl_steps, acc_steps, lr, grad_norm, "
                        "tokens_per_second); the last line is the run summary, {\"event\": \"summary\", ...} "
                        "with the fields of summary.json (steps, total_steps, finished, last, head, ...)")
    p.set_defaults(func=run)


def _print_step(step: int, row: dict) -> None:
    """One ``--json`` line per step, printed as the step finishes."""
    print(json.dumps({"event": "step", "step": step, "total_steps": row["total_steps"], **row}), flush=True)


def run(args) -> int:
    start_distributed(args)  # before JAX starts a backend
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
                   tensor_parallel=args.tensor_parallel,
                   dtype=None if args.dtype == "auto" else args.dtype,
                   export_embedding=not args.no_export_embedding)
    main = jax.process_index() == 0
    summary = run_training(job, progress=not args.json and main, on_step=_print_step if args.json and main else None)
    if not main:  # the other processes of a --distributed run
        return 0
    if args.json:
        print(json.dumps({"event": "summary", **summary}), flush=True)
    else:
        last = summary["last"] or {}
        accs = ", ".join(f"{a:.2f}" for a in last.get("acc_steps", []))
        loss = last.get("loss", float("nan"))
        print(f"trained {summary['steps']}/{summary['total_steps']} steps; last loss {loss:.4f}, "
              f"accuracy per TTT step [{accs}]")
        if summary.get("head"):
            print(f"head: {summary['head']}")
    return 0
