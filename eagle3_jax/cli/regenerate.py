"""``eagle3-jax regenerate``: answer training conversations with the target itself."""

from __future__ import annotations

import json
import os
import sys

from eagle3_jax.cli.options import (
    HelpFormatter,
    add_runtime_options,
    add_sampling_options,
    add_tree_options,
    check_configs,
    check_tree,
    load_tokenizer,
    positive_int,
    usage,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "regenerate",
        help="answer training conversations with the target itself",
        description="Replace every assistant turn of JSONL conversations by the target's own reply (batched "
                    "generation), so that a head learns the target's distribution. Writes JSONL with 'messages'. "
                    "Conversations go in blocks of --batch-size; each finished block is appended to OUTPUT.progress, "
                    "so a stopped run continues with --resume and gives the same output as an uninterrupted one; "
                    "OUTPUT itself appears, whole, at the end.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--target", required=True, metavar="DIR", help="the target model (directory or Hub id)")
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL conversations (OpenAI or ShareGPT)")
    p.add_argument("--output", required=True, metavar="FILE", help="the JSONL file to write (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run from OUTPUT.progress (same --data and settings; from the start if "
                        "there is none)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N conversations")
    p.add_argument("--max-new-tokens", type=positive_int, default=1024, help="tokens per reply at most")
    p.add_argument("--batch-size", type=positive_int, default=8, help="conversations generated together")
    add_sampling_options(p)
    add_runtime_options(p)
    spec = p.add_argument_group("speculative decoding (EAGLE-3)")
    spec.add_argument("--draft", metavar="DIR", default=None, help="speed generation up with an EAGLE-3 head")
    add_tree_options(spec)
    p.set_defaults(func=run)


def run(args) -> int:
    from eagle3_jax.atomic import atomic_file
    from eagle3_jax.generation import Generator
    from eagle3_jax.loading import load_draft, load_target
    from eagle3_jax.sampling import SamplingParams
    from eagle3_jax.training.data import read_conversations
    from eagle3_jax.training.regenerate import regenerate, write_jsonl

    if args.draft is None and any(v is not None for v in (args.num_steps, args.topk, args.num_draft_tokens)):
        raise usage("--num-steps/--tree-topk/--num-draft-tokens need --draft")
    spec = check_tree(args.num_steps, args.topk, args.num_draft_tokens) if args.draft is not None else None
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if os.path.exists(args.output) and os.path.exists(args.data) and os.path.samefile(args.output, args.data):
        from eagle3_jax.errors import InputError

        raise InputError(f"{args.output}: is also --data; write the regenerated conversations to another file")
    model_dir, _, draft_dir, _ = check_configs(args.target, args.draft)
    progress_path = args.output + PROGRESS_SUFFIX
    if os.path.exists(progress_path) and not args.resume:
        raise usage(f"{progress_path} holds a stopped run's progress: pass --resume to continue it, or delete it")
    # The output is checked (and its temporary file created) before hours of generation.
    with atomic_file(args.output, overwrite=args.overwrite) as tmp:
        conversations = read_conversations(args.data)[: args.limit]
        settings = {"target": os.path.abspath(model_dir), "data": os.path.abspath(args.data),
                    "conversations": len(conversations),
                    "draft": os.path.abspath(draft_dir) if draft_dir else None,
                    "tree": list(spec.knobs) if spec else None,
                    "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "seed": args.seed,
                    "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
        done = read_progress(progress_path, settings, conversations) if args.resume else {}
        tokenizer = load_tokenizer(model_dir, required=True)
        if not getattr(tokenizer, "chat_template", None):
            from eagle3_jax.errors import InputError

            raise InputError(f"{model_dir}: the tokenizer has no chat template, which regenerate needs to render "
                             "the conversations")
        target = load_target(model_dir, dtype=args.dtype, check_finite=args.check_finite)
        draft = (load_draft(draft_dir, target.config, dtype=args.dtype, check_finite=args.check_finite)
                 if draft_dir else None)
        gen = Generator(target, draft, num_steps=spec.num_steps if spec else None, topk=spec.topk if spec else None,
                        num_draft_tokens=spec.num_draft_tokens if spec else None, max_cache_len=args.max_cache_len,
                        tokenizer=tokenizer, attention=args.attention)
        if done:
            print(f"resuming: {len(done)} of {len(conversations)} conversations already regenerated",
                  file=sys.stderr)
        blocks = []
        try:
            with open(progress_path, "a" if done else "w", encoding="utf-8") as log:
                if not done:
                    _append(log, {"regenerate": PROGRESS_VERSION, **settings})

                def on_block(start: int, block: list[list[dict]]) -> None:
                    _append(log, *({"index": start + j, "messages": m} for j, m in enumerate(block)))
                    blocks.append(start)

                result = regenerate(gen, tokenizer, conversations, max_new_tokens=args.max_new_tokens,
                                    sampling=sampling, batch_size=args.batch_size, seed=args.seed, done=done,
                                    on_block=on_block)
        except BaseException:
            if not done and not blocks:  # nothing to resume: leave nothing behind
                os.unlink(progress_path)
            raise
        write_jsonl(result, tmp)
    os.unlink(progress_path)
    print(f"wrote {len(result)} conversations to {args.output}", file=sys.stderr)
    return 0


PROGRESS_SUFFIX = ".progress"
PROGRESS_VERSION = 1


def _append(log, *records: dict) -> None:
    """Appends whole lines and makes them durable: a kill leaves at most one cut-off last line."""
    log.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    log.flush()
    os.fsync(log.fileno())


def read_progress(path: str, settings: dict, conversations: list[list[dict]]) -> dict[int, list[dict]]:
    """The conversations a stopped run finished, checked against this run's data and settings.

    A cut-off last line (the run was killed while writing it) is dropped; a
    different --data, conversation count or setting is an error, since the
    resumed output would not be the uninterrupted run's.
    """
    from eagle3_jax.errors import InputError

    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break  # the line a kill cut off
            raise InputError(f"{path}: line {n + 1} is not JSON; delete the file to start over") from None
    if not records or records[0].get("regenerate") != PROGRESS_VERSION:
        raise InputError(f"{path}: not a progress file of eagle3-jax regenerate; delete it to start over")
    header = {k: v for k, v in records[0].items() if k != "regenerate"}
    changed = [k for k in settings if header.get(k) != settings[k]]
    if changed:
        shown = ", ".join(f"{k} {header.get(k)!r} -> {settings[k]!r}" for k in changed)
        raise InputError(f"{path}: the stopped run had other settings ({shown}); resume with the same ones, or "
                         "delete the file to start over")
    done: dict[int, list[dict]] = {}
    for r in records[1:]:
        i, messages = r.get("index"), r.get("messages")
        if not isinstance(i, int) or not 0 <= i < len(conversations) or not isinstance(messages, list):
            raise InputError(f"{path}: a malformed record; delete the file to start over")
        asked = [m for m in conversations[i] if m.get("role") != "assistant"]
        if [m for m in messages if m.get("role") != "assistant"] != asked:
            raise InputError(f"{path}: conversation {i} differs from --data's; delete the file to start over")
        done[i] = messages
    return done
