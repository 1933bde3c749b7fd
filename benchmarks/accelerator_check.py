#!/usr/bin/env python
"""One prepared check of a GPU or TPU machine: correctness, speed and memory, in one JSON.

Run it on the machine with the accelerator, from the repository root (no network needed):

    PYTHONPATH=. python benchmarks/accelerator_check.py --out $OUT/accelerator.json 2>&1 | tee $OUT/log

Sections, each timed and each written to the JSON as soon as it ends (a section that fails
records its error and the next one runs; sections past --budget seconds are skipped):

1. ``environment``: devices, JAX, jaxlib and Flax versions, the backend ``auto`` picks.
2. ``parity``: the Flax Qwen3/Llama targets against HF transformers (``parity_vs_hf.py``) on
   small float32 configs, run on the accelerator: logits, cached decode, greedy tokens.
3. ``decode_b1`` / ``decode_b8``: plain and speculative tokens/s of the Qwen3-4B shape with random
   weights (bfloat16; a random head accepts almost nothing, so this measures the overhead) and
   the step costs of a verify forward of N tokens over a decode step (``bench_decode.py``).
4. ``attention``: the platform's kernel backend against ``blockwise`` (``bench_attention.py``):
   step times at live lengths 2k and 8k in a 32k cache.
5. ``compiled_memory``: every program of Qwen3-4B with a 32k cache compiled for this device
   (``eagle3-jax compile --topology local``): arguments, temporaries, aliased bytes.

It takes about 5-8 minutes on one H100 (most of it compiling). Tables print as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _environment() -> dict:
    import flax
    import jax
    import jaxlib

    from eagle3_jax.attention import resolve_backend

    devices = jax.devices()
    return {"backend": jax.default_backend(), "devices": [str(d.device_kind) for d in devices],
            "device_count": len(devices), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "auto_attention": resolve_backend("auto"),
            "compute_capability": getattr(devices[0], "compute_capability", None)}


def _bench(module: str, argv: list[str]) -> dict:
    """Runs ``benchmarks/<module>.py`` with ``argv`` plus an --out file; returns what it wrote."""
    import importlib

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        code = importlib.import_module(module).main(argv + ["--out", out])
        if code not in (0, None):
            raise RuntimeError(f"{module} exited with {code}")
        with open(out) as f:
            return json.load(f)


def _compiled_memory() -> dict:
    import jax.numpy as jnp

    from eagle3_jax.aot import PRESETS, compile_report, topology

    reports = compile_report(PRESETS["qwen3-4b"](), topology("local"), dtype=jnp.bfloat16, capacity=32768, batch=1,
                             programs=["plain loop", "speculative loop"], log=print)
    return {"preset": "qwen3-4b", "cache": 32768, "batch": 1, "programs": [r.to_json() for r in reports]}


def _sections(kernel: str | None) -> list[tuple[str, object]]:
    decode = ["--random-init", "qwen3-4b", "--dtype", "bfloat16", "--context", "1024", "--verify-sizes",
              "1,4,8,16,32", "--num-prompts", "4", "--max-new-tokens", "128", "--repeats", "3"]
    attention = ["--random-init", "qwen3-4b", "--dtype", "bfloat16", "--live", "2048,8192", "--capacity", "32768",
                 "--tokens", "1,8", "--repeats", "5",
                 "--attention", f"{kernel},blockwise" if kernel else "blockwise"]
    return [
        ("environment", _environment),
        ("parity", lambda: _bench("parity_vs_hf", [])),
        ("decode_b1", lambda: _bench("bench_decode", decode + ["--batch", "1"])),
        ("decode_b8", lambda: _bench("bench_decode", decode + ["--batch", "8"])),
        ("attention", lambda: _bench("bench_attention", attention)),
        ("compiled_memory", _compiled_memory),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/accelerator.json", help="the JSON written (after every section)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds after which remaining sections are skipped")
    p.add_argument("--only", nargs="+", default=None, help="run only these sections")
    args = p.parse_args(argv)

    import jax

    from eagle3_jax.attention import resolve_backend

    kernel = resolve_backend("auto")
    kernel = None if kernel == "blockwise" else kernel
    result: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t_start = time.perf_counter()
    for name, fn in _sections(kernel):
        if args.only and name not in args.only:
            continue
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget:
            result["sections"][name] = {"skipped": f"over the budget of {args.budget:.0f} s ({elapsed:.0f} s used)"}
            continue
        print(f"\n=== {name} ({elapsed:.0f} s so far, {jax.default_backend()})", flush=True)
        t0 = time.perf_counter()
        try:
            value = fn()
            entry = {"seconds": time.perf_counter() - t0, "result": value}
        except Exception as e:  # one broken section must not lose the others' figures
            traceback.print_exc()
            entry = {"seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}
        result["sections"][name] = entry
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"=== {name}: {'error' if 'error' in entry else 'done'} in {entry['seconds']:.0f} s", flush=True)
    result["seconds"] = time.perf_counter() - t_start
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
