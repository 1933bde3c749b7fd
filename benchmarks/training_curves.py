"""Loss and per-TTT-step accuracy curves of an ``eagle3-jax train`` run.

Reads RUN/metrics.jsonl (one line per step; if a step appears twice, as in
logs written before resumes truncated them, the last line wins), averages the
metrics over windows of steps, prints a table, and writes a PNG with the
curves and a JSON summary.

    python benchmarks/training_curves.py RUN_DIR --out docs/figures/demo_head_training.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def read_metrics(path: str) -> list[dict]:
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def windows(rows: list[dict], size: int) -> list[dict]:
    """Mean loss, KL and accuracy per TTT step over consecutive windows of ``size`` steps."""
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        out.append({
            "steps": [chunk[0]["step"], chunk[-1]["step"]],
            "loss": float(np.mean([r["loss"] for r in chunk])),
            "kl_steps": np.mean([r["kl_steps"] for r in chunk], axis=0).tolist(),
            "acc_steps": np.mean([r["acc_steps"] for r in chunk], axis=0).tolist(),
            "lr": float(chunk[-1]["lr"]),
        })
    return out


def plot(rows: list[dict], path: str, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in rows])
    kernel = np.ones(smooth) / smooth

    def smoothed(values):
        values = np.asarray(values, float)
        if len(values) < smooth:
            return steps, values
        return steps[smooth - 1:], np.convolve(values, kernel, mode="valid")

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ttt = len(rows[0]["acc_steps"])
    for i in range(ttt):
        ax_loss.plot(*smoothed([r["kl_steps"][i] for r in rows]), label=f"step {i}")
        ax_acc.plot(*smoothed([r["acc_steps"][i] for r in rows]), label=f"step {i}")
    ax_loss.set(xlabel="training step", ylabel="KL to the target (nats)", title="loss minus teacher entropy")
    ax_acc.set(xlabel="training step", ylabel="draft top-1 = target top-1", title="accuracy per TTT step",
               ylim=(0, 1))
    ax_acc.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(f"moving average over {smooth} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", help="a run directory (or its metrics.jsonl)")
    parser.add_argument("--window", type=int, default=100, help="steps per table row")
    parser.add_argument("--smooth", type=int, default=25, help="moving-average width of the curves")
    parser.add_argument("--out", default="training_curves.png", help="the PNG to write (JSON beside it)")
    args = parser.parse_args(argv)
    path = os.path.join(args.run, "metrics.jsonl") if os.path.isdir(args.run) else args.run
    if not os.path.isfile(path):
        print(f"error: {path}: no such metrics file", file=sys.stderr)
        return 1
    rows = read_metrics(path)
    if not rows:
        print(f"error: {path}: no metrics lines", file=sys.stderr)
        return 1
    table = windows(rows, args.window)
    ttt = len(rows[0]["acc_steps"])
    print("| steps | loss | " + " | ".join(f"acc{i}" for i in range(ttt)) + " | KL step 0 | lr |")
    print("| --- | ---: | " + " | ".join("---:" for _ in range(ttt)) + " | ---: | ---: |")
    for w in table:
        accs = " | ".join(f"{a:.2f}" for a in w["acc_steps"])
        print(f"| {w['steps'][0]}-{w['steps'][1]} | {w['loss']:.2f} | {accs} | {w['kl_steps'][0]:.2f} | "
              f"{w['lr']:.1e} |")
    plot(rows, args.out, args.smooth)
    summary = os.path.splitext(args.out)[0] + ".json"
    with open(summary, "w", encoding="utf-8") as f:
        json.dump({"metrics": path, "steps": len(rows), "windows": table}, f, indent=2)
    print(f"wrote {args.out} and {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
