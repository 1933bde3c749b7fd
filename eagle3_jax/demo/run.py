"""``eagle3-jax demo``: speculative decoding end to end, offline, on the embedded pair.

Loads the demo target and its EAGLE-3 head from the package, completes a
code prompt with speculative decoding, and measures plain decoding on the
same prompt in the same run. Both are compiled first (untimed); then plain
and speculative runs are interleaved repeat by repeat, in alternating order
(:func:`eagle3_jax.timing.interleaved`), so that whatever else the machine
does hits both alike. The speedup reported is the median of the paired
per-repeat ratios with their spread (:func:`eagle3_jax.timing.paired_speedup`);
a spread reaching both sides of 1.0 is reported as noise. Every greedy
speculative output is checked to equal the plain output token for token.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable

from eagle3_jax.decoding.tree import DEMO_TREE
from eagle3_jax.demo import demo_paths
from eagle3_jax.errors import CheckpointError, InputError
from eagle3_jax.generation import Generator
from eagle3_jax.timing import interleaved, paired_speedup

# A byte-level BPE merges a newline with the next line's indentation, so a code prompt
# ends before the newline (a bare trailing newline is out of distribution).
DEFAULT_PROMPT = '''import os


def list_python_files(root):
    """Return the paths of all .py files under root, sorted."""'''
DEFAULT_KNOBS = DEMO_TREE  # the chain (4, 1, 5); eagle3_jax.decoding.tree says why it is not the library's default
DEFAULT_REPEATS = 5


def run_demo(prompt: str = DEFAULT_PROMPT, *, max_new_tokens: int = 128, knobs: tuple[int, int, int] = DEFAULT_KNOBS,
             repeats: int = DEFAULT_REPEATS, log: Callable[[str], None] | None = None) -> dict:
    """Runs the demo; returns its figures and texts as a dict.

    ``repeats`` interleaved timed runs of each method follow one untimed
    (compiling) run of each; ``log``, if given, is called with a line of
    progress before each phase.

    The dict holds ``prompt``, ``completion`` (the generated text),
    ``new_tokens``, ``knobs``, ``acceptance_length``, ``accept_lengths``,
    ``identical_to_plain`` (always True: a difference raises), ``compile_seconds``,
    ``repeats``, the median ``plain_tokens_per_second`` and
    ``speculative_tokens_per_second`` over the repeats, ``speedup`` (the median
    paired ratio), ``speedup_low`` and ``speedup_high`` (its spread),
    ``speedup_samples`` (one ratio per repeat), ``speedup_noise`` (True when the
    repeats disagree on which method is faster) and ``speedup_text`` (e.g.
    ``1.84x (1.71-1.93 over 5 repeats)``).
    """
    from transformers import AutoTokenizer

    from eagle3_jax.loading import load_draft, load_target

    if repeats < 1:
        raise InputError(f"repeats must be at least 1, got {repeats}")
    say = log or (lambda _line: None)
    target_dir, head_dir = demo_paths()
    if not (os.path.isdir(target_dir) and os.path.isdir(head_dir)):
        raise CheckpointError(f"the embedded demo pair is missing from {os.path.dirname(target_dir)}; "
                              "reinstall eagle3-jax or rebuild it (docs/demo.md)")
    say("loading the embedded demo pair")
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = load_target(target_dir, dtype="float32", progress=False)
    head = load_draft(head_dir, target.config, dtype="float32", progress=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
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
