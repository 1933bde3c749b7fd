"""``eagle3-jax demo``: the embedded pair, offline."""

from __future__ import annotations

import json

from eagle3_jax.cli.options import HelpFormatter, check_text, knob_triple, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="offline speculative decoding on the embedded demo pair",
        description="Load the embedded demo pair (a small Qwen3-architecture code model trained on the CPython "
                    "standard library, and its EAGLE-3 head trained with 'eagle3-jax train'), complete a code "
                    "prompt with speculative decoding, and print the text, the acceptance length and the "
                    "speedup over plain decoding measured in the same run. Needs no network.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--prompt", default=None, help="code to complete (default: a function header)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N", help="tokens to generate")
    p.add_argument("--knobs", type=knob_triple, default=None, metavar="D,K,N",
                   help="tree shape num_steps,topk,num_draft_tokens (default 4,1,5)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from eagle3_jax.decoding.tree import TreeSpec
    from eagle3_jax.demo.run import DEFAULT_KNOBS, DEFAULT_PROMPT, run_demo

    knobs = args.knobs or DEFAULT_KNOBS
    TreeSpec(*knobs)
    if args.prompt is not None:
        check_text(args.prompt, "--prompt")
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
