"""``eagle3-jax generate``: continue prompts with a target, optionally with an EAGLE-3 head."""

from __future__ import annotations

import argparse
import json
import sys

from eagle3_jax.cli.options import (
    EXIT_ERROR,
    HelpFormatter,
    add_head_overrides,
    add_runtime_options,
    add_sampling_options,
    add_tree_options,
    check_configs,
    check_tree,
    decode,
    encode,
    head_overrides,
    int_list,
    load_tokenizer,
    positive_int,
    usage,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with a target model",
        description="Generate continuations of one or more prompts with a Qwen3/Qwen2 target. "
                    "Several --prompt (or --prompt-ids) options form one batch.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--target", required=True, metavar="DIR",
                   help="target model: an HF directory, a converted directory, or a Hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="prompt text, tokenized with the target's tokenizer (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", type=int_list, metavar="IDS",
                     help="prompt as comma-separated token ids, no tokenizer needed (repeat for a batch)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each --prompt as a user turn with the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N",
                   help="generated tokens per prompt at most")
    add_sampling_options(p)
    p.add_argument("--stop-ids", type=int_list, default=None, metavar="IDS",
                   help="comma-separated token ids that end generation (default: the model's eos ids)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at eos; generate max-new-tokens")
    add_runtime_options(p)
    spec = p.add_argument_group("speculative decoding (EAGLE-3)")
    spec.add_argument("--draft", metavar="DIR", default=None,
                      help="EAGLE-3 draft head (SpecForge/SGLang format or converted); enables speculative decoding")
    add_tree_options(spec)
    add_head_overrides(spec)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they are committed (default: on for one prompt without --json)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt instead of text (with accept_lengths and acceptance_length)")
    p.set_defaults(func=run)


def weights_bytes(config, dtype) -> int:
    """The bytes of a target's weights in ``dtype`` (for the memory check before loading)."""
    import numpy as np

    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    per_layer = attn + 3 * c.hidden_size * c.intermediate_size
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return (c.num_hidden_layers * per_layer + embed) * np.dtype(dtype).itemsize


def run(args) -> int:
    from eagle3_jax.generation import Generator, check_memory, plan_batch
    from eagle3_jax.loading import load_draft, load_target, parse_dtype
    from eagle3_jax.sampling import SamplingParams

    if args.chat and not args.prompt:
        raise usage("--chat needs --prompt")
    if args.stream and args.json:
        raise usage("--stream prints text; it can not be combined with --json")
    knobs = (args.num_steps, args.topk, args.num_draft_tokens, args.draft_rope_theta, args.feature_layers)
    if args.draft is None and any(k is not None for k in knobs):
        raise usage("--num-steps/--topk/--num-draft-tokens/--draft-rope-theta/--feature-layers need --draft")
    spec = check_tree(args.num_steps, args.topk, args.num_draft_tokens) if args.draft is not None else None
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    overrides = head_overrides(args)
    model_dir, target_config, draft_dir, draft_config = check_configs(args.target, args.draft, **overrides)
    tokenizer = load_tokenizer(model_dir, required=bool(args.prompt))
    prompts = [encode(tokenizer, t, args.chat) for t in args.prompt] if args.prompt else args.prompt_ids
    stops = () if args.no_stop else args.stop_ids
    dtype = parse_dtype(args.dtype)
    prompts, settings, _, bucket = plan_batch(
        target_config, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_token_ids=stops,
        max_cache_len=args.max_cache_len, cache_dtype=dtype)
    check_memory(target_config, settings, len(prompts), bucket, draft_config=draft_config, spec=spec,
                 weights_bytes=weights_bytes(target_config, dtype))

    target = load_target(model_dir, dtype=args.dtype, progress=not args.json, check_finite=args.check_finite)
    draft = None
    if draft_dir is not None:
        draft = load_draft(draft_dir, target.config, dtype=args.dtype, progress=not args.json,
                           check_finite=args.check_finite, **overrides)
    gen = Generator(target, draft, num_steps=spec.num_steps if spec else None, topk=spec.topk if spec else None,
                    num_draft_tokens=spec.num_draft_tokens if spec else None, max_cache_len=args.max_cache_len)
    stream = args.stream if args.stream is not None else (len(prompts) == 1 and not args.json)
    printer = StreamPrinter(tokenizer, len(prompts)) if stream else None
    outputs = gen.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                           stop_token_ids=stops, stream=printer)
    for i, out in enumerate(outputs):
        text = decode(tokenizer, out.token_ids)
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
    return check_finite_outputs(outputs)


def check_finite_outputs(outputs) -> int:
    """Exit status 1 with an error line when a row stopped on non-finite logits (broken weights or numerics)."""
    from eagle3_jax.generation import nonfinite_message

    message = nonfinite_message(outputs)
    if message is None:
        return 0
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


class StreamPrinter:
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
