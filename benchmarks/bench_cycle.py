#!/usr/bin/env python
"""What one speculative cycle costs, phase by phase, in plain decode steps.

The loop's own functions (``eagle3_jax/decoding/speculative.py``) are
each run in a compiled loop of --iterations iterations, as they run in the
real loop (caches carried and updated in place), from the same state, batch
rows and context: a plain decode step (``plain.step``), the whole cycle
(``speculative.step``), and each of its phases alone: draft, verify, accept,
commit, extend. The plain step and the cycle also run as the library and
the server run them ("library step", "library cycle":
``planning.program_settings``, greedy rows given per row, the sampling
skipped at run time by a ``lax.cond``), so the cost of greedy as a runtime
value shows beside the greedy-only program. Every figure is the median of
interleaved repeats (one call of each loop per round), so machine load moves
them together. The cycle in plain steps is what an acceptance length must
beat before speculation pays: ``speedup = tau * t_plain / t_cycle``.

    python benchmarks/bench_cycle.py --target smollm2-hf --knobs 3,1,4 --out cycle.json
    python benchmarks/bench_cycle.py --random-init smollm2 --knobs 3,1,4 4,1,5

A random head of the target's shape (draft vocabulary --draft-vocab) is used
unless --draft is given: phase costs do not depend on what it accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from eagle3_jax import apply_default_flags

apply_default_flags()

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eagle3_jax import Eagle3Config, Eagle3DraftHead
from eagle3_jax.cli.options import knob_triple
from eagle3_jax.config import LlamaConfig
from eagle3_jax.decoding import plain, speculative
from eagle3_jax.decoding.common import DecodeSettings, RuntimeParams
from eagle3_jax.decoding.tree import TreeSpec
from eagle3_jax.loading import load_draft, load_target, parse_dtype
from eagle3_jax.models.registry import build_target
from eagle3_jax.planning import program_settings, row_params
from eagle3_jax.sampling import SamplingParams, next_keys

PRESETS = {
    "smollm2": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=1e5,
                           rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
                           eos_token_ids=(2,)),
}
PHASES = ("draft", "verify", "accept", "commit", "extend")
LIBRARY = ("library step", "library cycle")  # the same, in the programs the library and the server run


def loops(tg, dg, spec: TreeSpec, settings: DecodeSettings, plain_settings: DecodeSettings, m: int,
          library: DecodeSettings):
    """Jitted loops of ``m`` iterations of each function, carrying (and donating) what it updates.

    Each phase runs in a ``lax.fori_loop`` as it runs inside the real loop:
    caches updated in place, nothing copied. The phases' other inputs come
    from one real cycle (``prepare``); a scalar sum of each phase's outputs is
    carried too, so that nothing it computes is dropped as dead code.
    """

    def models(tw, dw):
        return nnx.merge(tg, tw), nnx.merge(dg, dw)

    def prepare(tw, dw, state, params):
        target, head = models(tw, dw)
        active = state.result.finish_reason == 0
        tree, dcache = speculative.draft(target, head, state, active, spec, settings)
        out = speculative.verify(target, head, tree, state.target_cache, active, settings)
        acc, length, nonfinite = speculative.accept(tree, out.logits, state.rng, active, params, settings, spec)
        emitted = acc.emitted(tree)
        feats = jnp.take_along_axis(out.features, acc.path[:, :, None], axis=1)
        return dict(active=active, tree=tree, dcache=dcache, logits=out.logits, vcache=out.cache, acc=acc,
                    length=length, nonfinite=nonfinite, emitted=emitted, feats=feats)

    def repeat(body):
        def run(carry, tw, dw, params, p):
            target, head = models(tw, dw)
            return jax.lax.fori_loop(0, m, lambda i, c: body(target, head, c, params, p), carry)
        return jax.jit(run, donate_argnums=(0,))

    def plain_body(target, head, state, params, p):
        return plain.step(target, state, params, plain_settings)

    def cycle_body(target, head, state, params, p):
        return speculative.step(target, head, state, params, settings, spec)

    def library_plain_body(target, head, state, params, p):
        return plain.step(target, state, p["library_params"], library)

    def library_cycle_body(target, head, state, params, p):
        return speculative.step(target, head, state, p["library_params"], library, spec)

    def draft_body(target, head, carry, params, p):
        state, total = carry
        tree, dcache = speculative.draft(target, head, state, p["active"], spec, settings)
        used = tree.tokens.sum() + tree.parents.sum() + tree.draft_finite.sum()
        return dataclasses.replace(state, draft_cache=dcache), total + used

    def verify_body(target, head, carry, params, p):
        cache, total = carry
        out = speculative.verify(target, head, p["tree"], cache, p["active"], settings)
        return out.cache, total + out.logits[:, :, 0].sum() + out.features[:, :, 0].sum()

    def accept_body(target, head, carry, params, p):
        rng, total = carry
        rng, sub = next_keys(rng, settings)
        acc, length, nonfinite = speculative.accept(p["tree"], p["logits"], sub, p["active"], params, settings, spec)
        return rng, total + length.sum() + acc.path.sum() + nonfinite.sum()

    def commit_body(target, head, carry, params, p):
        cache, result = carry
        cache, result, _ = speculative.commit(cache, result, p["tree"], p["acc"], p["length"], p["nonfinite"],
                                              p["active"], params, settings)
        return cache, result

    def extend_body(target, head, carry, params, p):
        cache, total = carry
        root = speculative.extend(target, head, cache, p["emitted"], p["feats"], p["length"], spec, settings)
        return root.cache, total + root.children.sum() + root.hidden.sum() + root.logp.sum()

    bodies = dict(zip(("plain step", "cycle", *PHASES, *LIBRARY),
                      (plain_body, cycle_body, draft_body, verify_body, accept_body, commit_body, extend_body,
                       library_plain_body, library_cycle_body)))
    return jax.jit(prepare), {name: repeat(body) for name, body in bodies.items()}


def copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def measure(target, head, knobs, *, batch: int, context: int, repeats: int, iterations: int, dtype) -> dict:
    cfg = target.config
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(10, cfg.vocab_size, size=(batch, context)), jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    params = RuntimeParams.make(stop_ids=())
    key = jax.random.key(0)
    tg, tw = nnx.split(target)
    dg, dw = nnx.split(head)
    out = {"batch": batch, "context": context, "iterations_per_call": iterations, "trees": {}}
    room = (repeats + 2) * iterations * 8  # slots the timed loops may commit (at most D+1 per iteration)
    settings = DecodeSettings(max_new_tokens=room, capacity=context + room, cache_dtype=jnp.dtype(dtype))
    plain_state = jax.jit(lambda tw, t, n: plain.start(nnx.merge(tg, tw), t, n, key, params, settings))(
        tw, tokens, lengths)
    library = program_settings(context + room, jnp.dtype(dtype))
    library_params = row_params(batch, SamplingParams(), (), library.max_new_tokens)  # greedy rows
    library_plain = jax.jit(lambda tw, t, n, lp: plain.start(nnx.merge(tg, tw), t, n, key, lp, library))(
        tw, tokens, lengths, library_params)
    for d, k, n in knobs:
        spec = TreeSpec(d, k, n)
        state = jax.jit(lambda tw, dw, t, n_, spec=spec: speculative.start(
            nnx.merge(tg, tw), nnx.merge(dg, dw), t, n_, key, params, settings, spec))(tw, dw, tokens, lengths)
        library_state = jax.jit(lambda tw, dw, t, n_, lp, spec=spec: speculative.start(
            nnx.merge(tg, tw), nnx.merge(dg, dw), t, n_, key, lp, library, spec))(tw, dw, tokens, lengths,
                                                                                library_params)
        prepare, fns = loops(tg, dg, spec, settings, settings, iterations, library)
        p = dict(prepare(tw, dw, state, params), library_params=library_params)
        def zero():
            return jnp.zeros((), jnp.float32)  # one per carry: carries are donated

        carries = {"plain step": copy(plain_state), "cycle": copy(state), "draft": (copy(state), zero()),
                   "verify": (copy(state.target_cache), zero()), "accept": (copy(state.rng), zero()),
                   "commit": (copy(p["vcache"]), copy(state.result)), "extend": (copy(p["dcache"]), zero()),
                   "library step": copy(library_plain), "library cycle": copy(library_state)}
        for name, fn in fns.items():  # compile and warm up
            carries[name] = jax.block_until_ready(fn(carries[name], tw, dw, params, p))
        samples = {name: [] for name in fns}
        for r in range(repeats):
            for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
                t0 = time.perf_counter()
                carries[name] = jax.block_until_ready(fns[name](carries[name], tw, dw, params, p))
                samples[name].append((time.perf_counter() - t0) / iterations)
        ms = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
        spread = {name: (min(v) * 1e3, max(v) * 1e3) for name, v in samples.items()}
        base = ms["plain step"]
        out["trees"][f"({d},{k},{n})"] = {
            "ms": ms, "min_max_ms": spread, "plain_steps": {name: v / base for name, v in ms.items()},
            "phases_sum_ms": sum(ms[name] for name in PHASES)}
    return out


def print_table(result: dict) -> None:
    trees = list(result["trees"])
    names = ["plain step", "cycle", *PHASES, *LIBRARY]
    print(f"\nbatch {result['batch']}, context {result['context']}: ms (in plain steps)")
    print(f"{'':>12s}" + "".join(f"{t:>22s}" for t in trees))
    for name in names:
        cells = []
        for t in trees:
            row = result["trees"][t]
            cells.append(f"{row['ms'][name]:9.2f} ({row['plain_steps'][name]:5.2f})")
        print(f"{name:>12s}" + "".join(f"{c:>22s}" for c in cells))
    sums = []
    for t in trees:
        row = result["trees"][t]
        sums.append(f"{row['phases_sum_ms']:9.2f} ({row['phases_sum_ms'] / row['ms']['plain step']:5.2f})")
    print(f"{'sum phases':>12s}" + "".join(f"{c:>22s}" for c in sums))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--target", help="target directory or GGUF file")
    src.add_argument("--random-init", choices=sorted(PRESETS), help="random weights of a known shape")
    p.add_argument("--draft", help="draft head directory (default: a random head of the target's shape)")
    p.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary of the random head")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--knobs", type=knob_triple, nargs="+", default=[(3, 1, 4)], metavar="D,K,N")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--context", type=int, default=256, help="committed tokens in the caches")
    p.add_argument("--repeats", type=int, default=7, help="timed calls of each loop, interleaved")
    p.add_argument("--iterations", type=int, default=10, help="loop iterations per timed call")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    dtype = parse_dtype(args.dtype)
    if args.random_init:
        target = build_target(PRESETS[args.random_init], dtype=dtype, rngs=nnx.Rngs(0))
        label = f"random {args.random_init}"
    else:
        target = load_target(args.target, dtype=dtype, progress=False)
        label = args.target
    if args.draft:
        head = load_draft(args.draft, target.config, dtype=dtype, progress=False)
    else:
        cfg = Eagle3Config.for_target(target.config, draft_vocab_size=min(args.draft_vocab, target.config.vocab_size))
        head = Eagle3DraftHead(cfg, dtype=dtype, rngs=nnx.Rngs(1))
    print(f"target: {label}, head: {args.draft or 'random'}, dtype {args.dtype}, device {jax.devices()[0].device_kind}")
    results = {"target": label, "draft": args.draft, "dtype": args.dtype, "backend": jax.default_backend(),
               "device": jax.devices()[0].device_kind, "runs": []}
    for batch in args.batch:
        r = measure(target, head, args.knobs, batch=batch, context=args.context, repeats=args.repeats,
                    iterations=args.iterations, dtype=dtype)
        print_table(r)
        results["runs"].append(r)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
