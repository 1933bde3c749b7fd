"""Benchmark prompts: where each benchmark's prompts come from, offline first.

For each benchmark the first source that has it wins:

1. an explicit file (``files[NAME]``, the CLI's ``--bench-file NAME=FILE``);
2. ``bench_dir/NAME.jsonl`` (``--bench-dir DIR``);
3. the slice shipped in the package (``eagle3_jax/data/bench/NAME.jsonl``: the
   first prompts of GSM8K, HumanEval, MATH-500 and MT-bench; see its README
   for sources and licences; CMMLU's licence keeps it out, C-Eval had no
   offline copy);
4. the Hugging Face Hub, only when it is reachable and ``datasets`` is
   installed.

:func:`find_benchmarks` returns what it found together with the benchmarks no
source could provide and why (the CLI skips those); :func:`load_benchmarks`
is the strict form for callers that need every benchmark they name.

Files are JSONL in the unified schema ``{"id", "benchmark", "turns":
[...], "reference"}`` (only ``turns`` is required). This module imports
neither JAX nor numpy nor transformers: the CLI builds its parsers from
:data:`BENCHMARKS` at startup.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import threading
from collections.abc import Mapping, Sequence

from eagle3_jax.errors import InputError
from eagle3_jax.jsonl import iter_jsonl

BENCHMARKS = ("gsm8k", "humaneval", "math500", "ceval", "cmmlu", "mtbench")

# Hub sources for online use: (dataset id, config, split, function row -> turns).
HUB_SOURCES = {
    "gsm8k": ("openai/gsm8k", "main", "test", lambda r: [r["question"]]),
    "humaneval": ("openai/openai_humaneval", None, "test", lambda r: [r["prompt"]]),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", lambda r: [r["problem"]]),
    "mtbench": ("HuggingFaceH4/mt_bench_prompts", None, "train", lambda r: list(r["prompt"])),
    "cmmlu": ("haonan-li/cmmlu", "agronomy", "test",
              lambda r: [f"{r['Question']}\nA. {r['A']}\nB. {r['B']}\nC. {r['C']}\nD. {r['D']}\n答案："]),
    "ceval": ("ceval/ceval-exam", "computer_network", "val",
              lambda r: [f"{r['question']}\nA. {r['A']}\nB. {r['B']}\nC. {r['C']}\nD. {r['D']}\n答案："]),
}

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bench")

# Why a benchmark has no shipped slice.
NOT_SHIPPED = {
    "cmmlu": "none shipped with eagle3-jax (CMMLU's licence, CC BY-NC-SA 4.0, is non-commercial)",
    "ceval": "none shipped with eagle3-jax (no offline copy of C-Eval was available)",
}

SHIPPED_SLICE = "shipped slice"
HUB_PROBE_SECONDS = 3.0


@dataclasses.dataclass
class Prompt:
    """One benchmark item: its id and the user turns (MT-bench has two; a later turn follows the model's reply)."""

    id: str
    turns: list[str]


@dataclasses.dataclass
class BenchmarkSet:
    """Prompts per benchmark, where each came from, and the benchmarks that were skipped.

    Attributes:
      prompts: name -> prompts, in the order the names were given.
      sources: name -> ``{"source": "--bench-file" | "--bench-dir" | "shipped slice" | "hub", "path": file or
        Hub dataset, "prompts": count}``.
      skipped: name -> why no source could provide it (and what would help).
      notes: things worth telling the user (a slice shorter than asked for, a --bench-dir without the file).
    """

    prompts: dict[str, list[Prompt]] = dataclasses.field(default_factory=dict)
    sources: dict[str, dict] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


def read_benchmark_file(path: str, limit: int | None = None) -> list[Prompt]:
    """The prompts of a JSONL file (its first ``limit`` when given)."""
    prompts = []
    for n, row in iter_jsonl(path):
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise InputError(f"{path}:{n}: expected a JSON object with a 'turns' list of strings")
        if not all(t.strip() for t in turns):
            raise InputError(f"{path}:{n}: a turn is empty")
        prompts.append(Prompt(id=str(row.get("id", n)), turns=turns))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise InputError(f"{path}: no prompts")
    return prompts


def shipped_path(name: str) -> str | None:
    """The shipped slice of ``name``, or None when the package has none."""
    path = os.path.join(SHIPPED_DIR, f"{name}.jsonl")
    return path if name in BENCHMARKS and os.path.isfile(path) else None


def _env_offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"offline ({var}={os.environ[var]})"
    return None


def _probe(host: str, timeout: float) -> bool:
    """Whether ``host`` accepts a TCP connection on 443 within ``timeout`` seconds (name lookup included)."""
    answer: list[bool] = []

    def connect():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=connect, daemon=True)  # a hanging name lookup must not hang the caller
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


_hub_state: dict[str, str | None] = {}


def hub_unavailable_reason() -> str | None:
    """None when benchmarks can be read from the Hub; else why not (offline, unreachable, no ``datasets``).

    Cheap: the environment is checked first, the network once per process
    (a connection attempt of at most a few seconds).
    """
    offline = _env_offline()
    if offline:
        return offline
    if "reason" not in _hub_state:
        if not _probe("huggingface.co", HUB_PROBE_SECONDS):
            _hub_state["reason"] = "offline (huggingface.co can not be reached)"
        elif importlib.util.find_spec("datasets") is None:
            _hub_state["reason"] = "it needs the datasets package (pip install datasets)"
        else:
            _hub_state["reason"] = None
    return _hub_state["reason"]


def read_benchmark_hub(name: str, limit: int | None = None) -> list[Prompt]:
    """The prompts of ``name`` from the Hugging Face Hub (needs network and ``datasets``)."""
    if name not in HUB_SOURCES:
        raise InputError(f"no Hub source known for {name!r}")
    repo, config, split, turns = HUB_SOURCES[name]
    reason = hub_unavailable_reason()
    if reason:
        raise InputError(f"{name}: can not read it from the Hub: {reason}")
    import datasets

    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # noqa: BLE001  (network, missing data set, bad config: all reported alike)
        raise InputError(f"{name}: could not load {repo} from the Hub ({type(e).__name__}: {e}); "
                         f"pass a local JSONL file instead ({local_file_hint(name)})") from None
    rows = list(ds)[:limit] if limit else list(ds)
    return [Prompt(id=f"{name}/{i}", turns=turns(r)) for i, r in enumerate(rows)]


def local_file_hint(name: str) -> str:
    """What local file would provide ``name``."""
    return (f"--bench-file {name}=FILE, or {name}.jsonl in a --bench-dir; one JSON object per line with a "
            "'turns' list of strings")


def _unavailable(name: str, hub_reason: str | None) -> str:
    """Why no source has ``name``, and what would help (never ``pip install datasets`` when offline)."""
    hub = f"the Hub: {hub_reason}" if hub_reason else "the Hub is not used"
    return (f"no local prompt file, {NOT_SHIPPED.get(name, 'no shipped slice')}, and {hub}; "
            f"a local file would help: {local_file_hint(name)}")


def _local_source(name: str, files: Mapping[str, str], bench_dir: str | None) -> tuple[str, str] | None:
    """(kind, path) of the first local file that provides ``name``, or None."""
    if name in files:
        if not os.path.exists(files[name]):
            raise InputError(f"{files[name]}: no such file (given for benchmark {name!r})")
        return "--bench-file", files[name]
    if bench_dir is not None:
        path = os.path.join(bench_dir, f"{name}.jsonl")
        if os.path.exists(path):
            return "--bench-dir", path
    shipped = shipped_path(name)
    return (SHIPPED_SLICE, shipped) if shipped else None


def find_benchmarks(names: Sequence[str], *, files: Mapping[str, str] | None = None, bench_dir: str | None = None,
                    limit: int | None = None, use_hub: bool = True) -> BenchmarkSet:
    """Prompts per benchmark from the first source that has it (see the module docstring).

    A benchmark no source provides is put in ``skipped`` with the reason; an
    unknown name, a missing explicit file, a ``bench_dir`` that is not a
    directory and a malformed file are InputErrors.
    """
    files = dict(files or {})
    if bench_dir is not None and not os.path.isdir(bench_dir):
        raise InputError(f"{bench_dir}: --bench-dir is not a directory")
    for name in names:
        if name not in BENCHMARKS and name not in files:
            raise InputError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} (or pass NAME=FILE)")
    found = BenchmarkSet()
    for name in dict.fromkeys(names):
        local = _local_source(name, files, bench_dir)
        if local is not None:
            kind, path = local
            found.prompts[name] = read_benchmark_file(path, limit)
            found.sources[name] = {"source": kind, "path": os.path.abspath(path), "prompts": len(found.prompts[name])}
            _note_local(found, name, kind, bench_dir, limit)
            continue
        hub_reason = hub_unavailable_reason() if use_hub else None
        if hub_reason is None and use_hub:
            try:
                found.prompts[name] = read_benchmark_hub(name, limit)
            except InputError as e:
                found.skipped[name] = str(e)
                continue
            repo, config, split, _ = HUB_SOURCES[name]
            found.sources[name] = {"source": "hub", "path": f"{repo} ({config or 'default'}, {split})",
                                   "prompts": len(found.prompts[name])}
            continue
        found.skipped[name] = _unavailable(name, hub_reason)
    return found


def _note_local(found: BenchmarkSet, name: str, kind: str, bench_dir: str | None, limit: int | None) -> None:
    if kind != SHIPPED_SLICE:
        return
    n = len(found.prompts[name])
    if bench_dir is not None:
        found.notes.append(f"{name}: {os.path.join(bench_dir, name + '.jsonl')} not found; using the shipped slice "
                           f"({n} prompts)")
    if limit is not None and n < limit:
        found.notes.append(f"{name}: the shipped slice has {n} prompts, fewer than the {limit} asked for; the full "
                           f"set needs a local file ({local_file_hint(name)})")


def describe_skipped(skipped: Mapping[str, str]) -> str:
    """One line per skipped benchmark: ``NAME: reason``."""
    return "\n".join(f"{name}: {reason}" for name, reason in skipped.items())


def load_benchmarks(names: Sequence[str], *, files: Mapping[str, str] | None = None, bench_dir: str | None = None,
                    limit: int | None = None, skip_unavailable: bool = False) -> dict[str, list[Prompt]]:
    """Prompts per benchmark (see :func:`find_benchmarks` for the sources).

    A benchmark that no source provides is an InputError naming it and what
    would help, unless ``skip_unavailable`` (then it is left out, and only
    having none at all is an error).
    """
    found = find_benchmarks(names, files=files, bench_dir=bench_dir, limit=limit)
    if found.skipped and (not skip_unavailable or not found.prompts):
        raise InputError("no prompts for " + "; ".join(f"{n}: {r}" for n, r in found.skipped.items()))
    return found.prompts
