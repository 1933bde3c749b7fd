"""``eagle3-jax demo``: speculative decoding end to end, offline, on the embedded pair.

Loads the demo target and its EAGLE-3 head from the package, completes a
code prompt with speculative decoding, and measures plain decoding on the
same prompt in the same run (both compiled first, then timed), so the
speedup printed is a same-machine, same-run ratio. Greedy speculative
output is checked to equal the plain output token for token.
"""

from __future__ import annotations

import os
import time

from eagle3_jax.demo import demo_paths
from eagle3_jax.errors import CheckpointError, InputError
from eagle3_jax.generation import Generator

# A byte-level BPE merges a newline with the next line's indentation, so a code prompt
# ends before the newline (a bare trailing newline is out of distribution).
DEFAULT_PROMPT = '''import os


def list_python_files(root):
    """Return the paths of all .py files under root, sorted."""'''
DEFAULT_KNOBS = (4, 1, 5)


def run_demo(prompt: str = DEFAULT_PROMPT, *, max_new_tokens: int = 128, knobs: tuple[int, int, int] = DEFAULT_KNOBS,
             repeats: int = 3) -> dict:
    """Runs the demo; returns its figures and texts as a dict."""
    from transformers import AutoTokenizer

    from eagle3_jax.loading import load_draft, load_target

    target_dir, head_dir = demo_paths()
    if not (os.path.isdir(target_dir) and os.path.isdir(head_dir)):
        raise CheckpointError(f"the embedded demo pair is missing from {os.path.dirname(target_dir)}; "
                              "reinstall eagle3-jax or rebuild it (docs/demo.md)")
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = load_target(target_dir, dtype="float32", progress=False)
    head = load_draft(head_dir, target.config, dtype="float32", progress=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError("the prompt is empty")
    plain = Generator(target)
    spec = Generator(target, head, num_steps=knobs[0], topk=knobs[1], num_draft_tokens=knobs[2])

    def timed(gen):
        first = gen.generate([ids], max_new_tokens=max_new_tokens)[0]  # compiles
        best = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = gen.generate([ids], max_new_tokens=max_new_tokens)[0]
            seconds = time.perf_counter() - t0
            best = (out, seconds) if best is None or seconds < best[1] else best
        return first, best

    plain_first, (plain_out, plain_s) = timed(plain)
    spec_first, (spec_out, spec_s) = timed(spec)
    if spec_out.token_ids != plain_out.token_ids:
        raise AssertionError("speculative and plain greedy outputs differ; please report this bug")
    return {
        "prompt": prompt,
        "completion": tokenizer.decode(spec_out.token_ids, skip_special_tokens=True),
        "new_tokens": len(spec_out.token_ids),
        "knobs": list(knobs),
        "acceptance_length": spec_out.acceptance_length,
        "accept_lengths": spec_out.accept_lengths,
        "plain_tokens_per_second": len(plain_out.token_ids) / plain_s,
        "speculative_tokens_per_second": len(spec_out.token_ids) / spec_s,
        "speedup": plain_s / spec_s * len(spec_out.token_ids) / max(len(plain_out.token_ids), 1),
        "compile_seconds": plain_first.compile_seconds + spec_first.compile_seconds,
        "identical_to_plain": True,
    }
