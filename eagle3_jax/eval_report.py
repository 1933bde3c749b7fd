"""Reporting an evaluation: the markdown tables, the accept-length histograms, the JSON, and the report folder.

Every function here takes the results as :func:`eagle3_jax.evaluation.run_evaluation` returns them (an
:class:`~eagle3_jax.eval_records.EvalResults`), or their JSON form: what
:func:`eagle3_jax.evaluation.evaluate` returns, or a report's ``results.json`` read back from disk. Both render
alike, because the tables and figures are drawn from the JSON form (a record's ``to_json()``), which is also what
``results.json`` holds.

This module imports neither JAX nor a model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from eagle3_jax.atomic import atomic_directory, check_destination
from eagle3_jax.eval_records import PLAIN, EvalResults, MethodResult, MethodRun

# The results of an evaluation: the record, or its JSON form (e.g. a report's results.json read back).
Results = EvalResults | Mapping[str, Any]
# One method's entry in a benchmark row: a record, or its JSON form.
Entry = MethodResult | MethodRun | Mapping[str, Any]

REPORT_FORMAT = "eagle3-jax/eval-report"
REPORT_FILES = {"markdown": "results.md", "json": "results.json", "png": "accept_lengths.png"}
SLIM_DROPPED = ("accept_lengths", "outputs")


def results_json(results: Results) -> Mapping[str, Any]:
    """The JSON form of ``results``: a record's ``to_json()``; a mapping (already JSON) as it is."""
    return results.to_json() if isinstance(results, EvalResults) else results


def _entry_json(entry: Entry) -> Mapping[str, Any]:
    return entry.to_json() if isinstance(entry, (MethodResult, MethodRun)) else entry


def model_name(path: str | None) -> str | None:
    """A model's name for reports: a Hub id as it is, a directory by its last two components
    (``/x/models/Qwen3-8B/`` -> ``models/Qwen3-8B``; ``.../assets/target`` -> ``assets/target``)."""
    if not path:
        return None
    if not os.path.exists(path):  # a Hub id (owner/name)
        return path
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return "/".join(p for p in parts[-2:] if p)


def greedy_mismatches(results: Results) -> list[str]:
    """One line per benchmark and method whose greedy output differs from plain decoding, or whose timed
    repeats gave other tokens than its first run (the same prompts and seed must give the same tokens)."""
    results = results_json(results)
    lines = []
    for name, row in results["benchmarks"].items():
        for k in results["knobs"]:
            if row.get(k, {}).get("identical_to_plain") is False:
                lines.append(f"{name} {k}: {row[k].get('first_difference', 'outputs differ')}")
        for k, res in row.items():
            if isinstance(res, dict) and res.get("repeats_identical") is False:
                lines.append(f"{name} {k}: a timed repeat gave other tokens than the first run")
    return lines


def slim_results(results: Results) -> dict[str, Any]:
    """``results`` (as JSON) without the per-step and per-prompt lists (accept lengths, generated tokens)."""
    results = results_json(results)
    return {**results, "benchmarks": {b: {k: {kk: vv for kk, vv in v.items() if kk not in SLIM_DROPPED}
                                          for k, v in row.items()} for b, row in results["benchmarks"].items()}}


def speed_cell(r: Entry) -> str:
    """A speedup as a table shows it: median (lowest-highest), and ', noise' when the repeats disagree."""
    r = _entry_json(r)
    if r.get("speedup") is None:
        return "n/a"
    text = f"{r['speedup']:.2f}x"
    if "speedup_low" in r:
        text += f" ({r['speedup_low']:.2f}-{r['speedup_high']:.2f})"
    return text + (", noise" if r.get("speedup_noise") else "")


def _same_cell(r: Mapping[str, Any]) -> str:
    same = r.get("identical_to_plain")
    return "not checked (sampling)" if same is None else ("yes" if same else "**NO** (a bug in float32)")


def markdown_table(results: Results) -> str:
    """The acceptance-length table (one column per tree shape), then speed, sources and skipped benchmarks."""
    results = results_json(results)
    knobs = results["knobs"]
    head = "| benchmark | " + " | ".join(f"acc_length {k}" for k in knobs) + " |"
    lines = [head, "|" + " --- |" * (len(knobs) + 1)]
    for name, row in results["benchmarks"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]['acceptance_length']:.2f}" for k in knobs) + " |")
    if any(PLAIN in row for row in results["benchmarks"].values()):
        lines += _speed_lines(results)
    lines += _source_lines(results)
    return "\n".join(lines) + "\n"


def _speed_lines(results: Mapping[str, Any]) -> list[str]:
    knobs = results["knobs"]
    lines = ["", "| benchmark | plain tok/s | " + " | ".join(f"{k} tok/s | {k} speedup | {k} = plain"
                                                            for k in knobs) + " |",
             "|" + " --- |" * (3 * len(knobs) + 2)]
    for name, row in results["benchmarks"].items():
        cells = [f"{row[k]['tokens_per_second']:.1f} | {speed_cell(row[k])} | {_same_cell(row[k])}" for k in knobs]
        lines.append(f"| {name} | {row[PLAIN]['tokens_per_second']:.1f} | " + " | ".join(cells) + " |")
    repeats = results.get("repeats")
    lines += ["", (f"Speedup: the median of {repeats} interleaved repeats of every batch (lowest-highest); "
                   "\"noise\" means the repeats do not agree which method is faster, so the figure can not tell. "
                   "\"= plain\": whether the speculative tokens equal plain decoding's (greedy decoding only).")]
    return lines


def _source_lines(results: Mapping[str, Any]) -> list[str]:
    lines = []
    if results.get("target") or results.get("draft"):
        lines += ["", f"Target: {results.get('target')}; draft: {results.get('draft')}."]
    if results.get("sources"):
        lines += ["", "Prompts:", ""]
        lines += [f"- {name}: {s['prompts']} from {s['source']} ({s['path']})"
                  for name, s in results["sources"].items()]
    if results.get("skipped"):
        lines += ["", "Skipped:", ""]
        lines += [f"- {name}: {reason}" for name, reason in results["skipped"].items()]
    return lines


def accept_histogram(results: Results, path: str) -> str:
    """A PNG with one histogram of accept lengths per benchmark and tree shape, naming the models and counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = results_json(results)
    knobs, names = results["knobs"], list(results["benchmarks"])
    fig, axes = plt.subplots(max(len(names), 1), max(len(knobs), 1), squeeze=False,
                             figsize=(4.6 * max(len(knobs), 1), 3.2 * max(len(names), 1) + 0.6))
    for r, name in enumerate(names):
        for c, k in enumerate(knobs):
            _histogram_panel(axes[r][c], name, k, results["benchmarks"][name].get(k, {}))
    fig.suptitle(figure_title(results))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def figure_title(results: Results) -> str:
    """The histogram figure's title: the models (directory base names)."""
    results = results_json(results)
    return f"Accept lengths. Target: {results.get('target') or '?'}; draft: {results.get('draft') or '?'}"


def panel_title(name: str, knobs: str, res: Entry) -> str:
    """A histogram panel's title: benchmark, tree shape, prompt count and acceptance length."""
    res = _entry_json(res)
    values = res.get("accept_lengths", [])
    mean = sum(values) / len(values) if values else 1.0
    prompts = res.get("prompts")
    count = f"{prompts} prompts, " if prompts is not None else ""
    return f"{name}, tree {knobs}: {count}acc. length {mean:.2f}"


def _histogram_panel(ax: Any, name: str, knobs: str, res: Mapping[str, Any]) -> None:
    values = res.get("accept_lengths", [])
    top = max(values) if values else 1
    counts = np.bincount(values, minlength=top + 1)[1:]
    ax.bar(np.arange(1, top + 1), counts / max(counts.sum(), 1), color="#3b6ea8")
    ax.set_title(panel_title(name, knobs, res), fontsize=10)
    ax.set_xlabel("tokens committed per verify step")
    ax.set_ylabel("fraction of steps")
    ax.set_xticks(np.arange(1, top + 1))


# A list of numbers where JSON structure can open one (at a line's start, or after a key), never inside a string.
_NUMBER_LIST = re.compile(r'(^ *|(?<!\\)": )\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]', re.MULTILINE)


def report_json(results: Results) -> str:
    """Indented JSON with every list of numbers (tokens, accept lengths, timings) on one line."""
    text = json.dumps(results_json(results), indent=1)
    return _NUMBER_LIST.sub(lambda m: m.group(1) + "[" + ", ".join(v.strip() for v in m.group(2).split(",")) + "]",
                            text)


def is_report(path: str) -> bool:
    """True if ``path`` is a directory that :func:`write_report` wrote (its results.json names the format)."""
    try:
        with open(os.path.join(path, REPORT_FILES["json"]), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == REPORT_FORMAT


def check_report_destination(out_dir: str, overwrite: bool = False) -> str:
    """Fails early (CheckpointError) unless ``out_dir`` can take a report; returns its absolute path.

    ``out_dir`` must not exist, or be an empty directory, or (with
    ``overwrite``) hold an earlier report.
    """
    return check_destination(out_dir, overwrite=overwrite, replaceable=is_report, what="evaluation report",
                             empty_ok=True)


def write_report(results: Results, out_dir: str, overwrite: bool = False) -> dict[str, str]:
    """results.md, results.json and accept_lengths.png in ``out_dir``, all at once
    (see :func:`check_report_destination`); returns their paths by kind (``markdown``, ``json``, ``png``)."""
    results = results_json(results)
    out_dir = os.path.abspath(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite, replaceable=is_report, what="evaluation report",
                          empty_ok=True) as tmp:
        with open(os.path.join(tmp, REPORT_FILES["markdown"]), "w", encoding="utf-8") as f:
            f.write(markdown_table(results))
        with open(os.path.join(tmp, REPORT_FILES["json"]), "w", encoding="utf-8") as f:
            f.write(report_json({"format": REPORT_FORMAT, **results}))
        accept_histogram(results, os.path.join(tmp, REPORT_FILES["png"]))
    return {k: os.path.join(out_dir, name) for k, name in REPORT_FILES.items()}
