#!/usr/bin/env python
"""Load time: HF safetensors directory vs the converted orbax directory, with and without the finiteness check.

Builds a random Qwen3 of the chosen size with transformers (bfloat16 on disk,
as published checkpoints are), converts it with ``eagle3-jax convert``, and
times ``load_target`` on both, with ``check_finite`` on (the default) and off,
interleaved, in one run. Prints a table and writes JSON.

    python benchmarks/bench_load.py --layers 8 --hidden 1024 --out bench_out/load.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from eagle3_jax import apply_default_flags

apply_default_flags()  # before JAX starts a backend: the XLA flags the CLI uses

import jax
import torch
import transformers
from flax import nnx

from eagle3_jax import convert_target, load_target


def timed_load(path, dtype, check_finite):
    t0 = time.perf_counter()
    model = load_target(path, dtype=dtype, progress=False, check_finite=check_finite)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    seconds = time.perf_counter() - t0
    del model
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="dtype to load into")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = transformers.Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                                   num_key_value_heads=max(1, args.hidden // 512), head_dim=128,
                                   tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as d:
        hf_dir, conv_dir = os.path.join(d, "hf"), os.path.join(d, "conv")
        model = transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16)
        n_params = sum(t.numel() for t in model.parameters())
        model.save_pretrained(hf_dir)
        del model
        t0 = time.perf_counter()
        convert_target(hf_dir, conv_dir, progress=False)
        convert_s = time.perf_counter() - t0
        times = {(fmt, check): [] for fmt in ("hf", "conv") for check in (True, False)}
        for _ in range(args.repeats):  # interleaved, so that load on the machine affects all alike
            for (fmt, check), runs in times.items():
                runs.append(timed_load(hf_dir if fmt == "hf" else conv_dir, args.dtype, check))
    best = {k: min(v) for k, v in times.items()}
    hf_s, conv_s = best[("hf", True)], best[("conv", True)]
    gigabytes = n_params * 2 / 1e9
    result = {"params": n_params, "backend": jax.default_backend(), "load_dtype": args.dtype,
              "hf_safetensors_seconds": hf_s, "converted_orbax_seconds": conv_s, "convert_seconds": convert_s,
              "speedup": hf_s / conv_s,
              "hf_safetensors_seconds_unchecked": best[("hf", False)],
              "converted_orbax_seconds_unchecked": best[("conv", False)],
              "finite_check_seconds_per_gb_hf": (hf_s - best[("hf", False)]) / gigabytes,
              "finite_check_seconds_per_gb_converted": (conv_s - best[("conv", False)]) / gigabytes,
              "all_runs": {f"{fmt} check_finite={check}": runs for (fmt, check), runs in times.items()}}
    print(f"{'model':>14s} {'backend':>8s} {'HF safetensors':>15s} {'converted':>10s} {'speedup':>8s} "
          f"{'HF unchecked':>13s} {'conv unchecked':>15s}")
    print(f"{n_params / 1e6:11.0f} M {result['backend']:>8s} {hf_s:14.2f}s {conv_s:9.2f}s {hf_s / conv_s:7.2f}x "
          f"{best[('hf', False)]:12.2f}s {best[('conv', False)]:14.2f}s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
