"""``eagle3-jax regenerate``: answer training conversations with the target itself."""

from __future__ import annotations

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
                    "generation), so that a head learns the target's distribution. Writes JSONL with 'messages'.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--target", required=True, metavar="DIR", help="the target model (directory or Hub id)")
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL conversations (OpenAI or ShareGPT)")
    p.add_argument("--output", required=True, metavar="FILE", help="the JSONL file to write (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
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
        raise usage("--num-steps/--topk/--num-draft-tokens need --draft")
    spec = check_tree(args.num_steps, args.topk, args.num_draft_tokens) if args.draft is not None else None
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if os.path.exists(args.output) and os.path.exists(args.data) and os.path.samefile(args.output, args.data):
        from eagle3_jax.errors import InputError

        raise InputError(f"{args.output}: is also --data; write the regenerated conversations to another file")
    model_dir, _, draft_dir, _ = check_configs(args.target, args.draft)
    # The output is checked (and its temporary file created) before hours of generation.
    with atomic_file(args.output, overwrite=args.overwrite) as tmp:
        conversations = read_conversations(args.data)[: args.limit]
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
        result = regenerate(gen, tokenizer, conversations, max_new_tokens=args.max_new_tokens, sampling=sampling,
                            batch_size=args.batch_size, seed=args.seed)
        write_jsonl(result, tmp)
    print(f"wrote {len(result)} conversations to {args.output}", file=sys.stderr)
    return 0
