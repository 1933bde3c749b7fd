#!/usr/bin/env python
"""The OpenAI-compatible server under concurrent clients: throughput and latency, measured in one run.

For each mode (spec: the target with its EAGLE-3 head; plain: the target
alone) and each admission policy (continuous batching; static batching, where
waiting requests start only when the whole batch has finished) one
``eagle3-jax serve`` process is started, warmed up, and reused for every
client count in --clients. For each client count, that many closed-loop
clients (each sends its next request as soon as its previous one has ended)
stream ``/v1/completions`` requests until --requests have completed. Every
request is greedy (temperature 0) with ``ignore_eos``, so it generates exactly
its ``max_tokens``, drawn from a seeded RNG between --min-tokens and
--max-tokens: mixed lengths, where continuous batching beats static batching.
A client count's requests (prompts and lengths) are the same in every mode and
admission, so the configurations are comparable.

Per request: TTFT (send -> first streamed chunk with non-empty text), end-to-end
latency (send -> end of the stream), completion tokens (the final chunk's
usage), and the inter-token latency ``(time of the last text chunk - time of
the first) / (completion_tokens - 1)``. The server streams a chunk per decoding
chunk (--chunk loop iterations; a speculative iteration commits several tokens),
so a chunk carries several tokens: ITL is a per-token average over the stream,
not the gap between two chunks.

Per configuration: output tokens/s (completion tokens over the wall time from
the first send to the last end), requests/s, TTFT/ITL/E2E p50 and p99, and the
server's mean acceptance length (tokens committed per target forward) from
``GET /metrics`` (histogram ``eagle3_acceptance_length``, before/after
difference). Then the ratios: continuous vs static throughput (same mode and
clients) and spec vs plain throughput (same admission and clients).

Prints two tables, writes JSON (--out) with every configuration, every
request's figures, the settings and the machine. Timings are reported, never
asserted.

Default models: the toy demo pair (eagle3_jax/demo, `demo_paths("toy")`; its tree is the chain
4,1,5 as in ``eagle3-jax demo``), with short Python code prompts.

    python benchmarks/bench_serve.py
    python benchmarks/bench_serve.py --clients 1,8 --requests 8 --max-tokens 32 --modes spec --admission continuous
    python benchmarks/bench_serve.py --target Qwen/Qwen3-4B-Thinking-2507 --draft DIR --prompts prompts.jsonl \\
        --max-batch 16 --max-cache-len 2048 --clients 1,16,64 --min-tokens 64 --max-tokens 512 \\
        --out bench_out/serve_4b.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

try:
    import httpx
except ImportError:  # the maintained fork installs as httpx2 (same API)
    import httpx2 as httpx

# Short code prompts in the demo target's domain (the CPython standard library). A byte-level BPE merges a newline
# with the next line's indentation, so each ends before a newline (as eagle3_jax/demo/run.py's prompt).
DEMO_PROMPTS = [
    'import os\n\n\ndef list_python_files(root):\n    """Return the paths of all .py files under root, sorted."""',
    'def add(a, b):\n    """Return the sum of a and b."""',
    'def is_prime(n):\n    """Return True if n is a prime number."""',
    'def read_lines(path):\n    """Return the lines of the file at path, without newlines."""',
    'def flatten(items):\n    """Flatten a list of lists into one list."""',
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):',
    'def parse_header(line):\n    """Split an HTTP header line into (name, value)."""',
    'import re\n\n\ndef split_words(text):\n    """Return the words of text, lower-cased."""',
    'def _quote(s):\n    """Quote s for use in a shell command."""',
    'class Counter(dict):\n    """Dict subclass for counting hashable items."""\n\n    def __missing__(self, key):',
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""',
    'import json\n\n\ndef load_config(path):\n    """Read a JSON configuration file and return a dict."""',
]
DEMO_TREE = "4,1,5"  # eagle3_jax.decoding.tree.DEMO_TREE (not imported: this process stays free of JAX)


# ------------------------------------------------------------------ options

def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [x.strip() for x in text.split(",") if x.strip()]
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return list(dict.fromkeys(values))
    return parse


def _tree(text: str) -> str:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected D,K,N (e.g. 3,1,4), got {text!r}")
    return ",".join(p.strip() for p in parts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("models and server")
    m.add_argument("--target", default=None, metavar="DIR",
                   help="target model (HF or converted directory, or Hub id); default the toy demo pair's target")
    m.add_argument("--draft", default=None, metavar="DIR",
                   help="EAGLE-3 head for the spec mode; default the demo head when --target is not given")
    m.add_argument("--no-draft", action="store_true", help="no head: run the plain mode only")
    m.add_argument("--modes", type=_choices(("spec", "plain")), default=["spec", "plain"],
                   help="spec (speculative decoding with the head) and/or plain (default: spec,plain)")
    m.add_argument("--admission", type=_choices(("continuous", "static")), default=["continuous", "static"],
                   help="the servers' admission policies (default: continuous,static)")
    m.add_argument("--max-batch", type=int, default=8, metavar="B", help="the server's batch rows (default: 8)")
    m.add_argument("--max-cache-len", type=int, default=512, metavar="S",
                   help="the server's KV slots per request (default: 512)")
    m.add_argument("--chunk", type=int, default=4, metavar="C",
                   help="the server's loop iterations between admissions (default: 4)")
    m.add_argument("--tree", type=_tree, default=None, metavar="D,K,N",
                   help="the spec mode's tree (num_steps,topk,num_draft_tokens); default 4,1,5 for the demo pair, "
                        "the server's default otherwise")
    m.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for every server (repeatable), e.g. --server-arg=--dtype=bfloat16")
    m.add_argument("--server-log", default=None, metavar="FILE",
                   help="where the servers' stderr goes (default: a temporary file; its path is printed on failure)")
    m.add_argument("--ready-timeout", type=float, default=900.0, metavar="SECONDS",
                   help="how long a server may take to load and compile (default: 900)")
    w = p.add_argument_group("workload")
    w.add_argument("--clients", type=_int_list, default=[1, 8, 64], metavar="N,N,...",
                   help="concurrent closed-loop clients, one measurement each (default: 1,8,64)")
    w.add_argument("--requests", type=int, default=None, metavar="R",
                   help="requests per measurement (default: max(2 * clients, 8))")
    w.add_argument("--min-tokens", type=int, default=16, help="shortest max_tokens of a request (default: 16)")
    w.add_argument("--max-tokens", type=int, default=96, help="longest max_tokens of a request (default: 96)")
    w.add_argument("--prompts", default=None, metavar="FILE",
                   help="a JSONL file, one {\"prompt\": text or token ids} per line ({\"turns\": [...]} also works: "
                        "the first turn, sent as a plain completion); default short code prompts for the demo")
    w.add_argument("--num-prompts", type=int, default=32, metavar="P",
                   help="use the first P prompts of --prompts (each is sent once in the warm-up; default: 32)")
    w.add_argument("--warmup", choices=["lengths", "prompts"], default="prompts",
                   help="each server's untimed warm-up: 'prompts' (default) sends every prompt once (2 tokens "
                        "each: each prompt bucket's prefill compiles on its first use); 'lengths' also sends one "
                        "request of each max_tokens in 1..--max-tokens")
    w.add_argument("--seed", type=int, default=0, help="seed of the requests' prompts and lengths (default: 0)")
    w.add_argument("--request-timeout", type=float, default=900.0, metavar="SECONDS",
                   help="a request's timeout (default: 900)")
    p.add_argument("--out", default="bench_out/serve.json", help="write the results as JSON here "
                   "(default: bench_out/serve.json; '' for none)")
    return p


# ------------------------------------------------------------------ prompts and plans

def load_prompts(path: str, limit: int) -> list:
    """Prompts (strings or token-id lists) from a JSONL file's "prompt" (or first "turns") fields."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise SystemExit(f"--prompts: {path} line {number} is not JSON ({e})") from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if prompt is None and isinstance(row, dict) and isinstance(row.get("turns"), list) and row["turns"]:
                prompt = row["turns"][0]
            ok = (isinstance(prompt, str) and prompt) or (
                isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt))
            if not ok:
                raise SystemExit(f"--prompts: {path} line {number} has no \"prompt\" (a non-empty string or a "
                                 "list of token ids)")
            out.append(prompt)
            if len(out) >= limit:
                break
    if not out:
        raise SystemExit(f"--prompts: {path} has no prompts")
    return out


def make_plan(prompts: list, requests: int, clients: int, args) -> list[tuple[int, int]]:
    """(prompt index, max_tokens) per request: the same for every mode and admission at this client count."""
    rng = random.Random(args.seed * 1_000_003 + clients)
    return [(rng.randrange(len(prompts)), rng.randint(args.min_tokens, args.max_tokens)) for _ in range(requests)]


# ------------------------------------------------------------------ the server process

class ServerProcess:
    """One ``eagle3-jax serve --json`` subprocess: started, waited for, stopped."""

    def __init__(self, cmd: list[str], log_path: str, label: str):
        self.cmd, self.log_path, self.label = cmd, log_path, label
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.ready: dict | None = None

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:  # keeps reading after the ready line: a full pipe would block the server
            self.lines.put(line)
        self.lines.put(None)

    def start(self, timeout: float) -> dict:
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n===== {self.label}: {' '.join(self.cmd)}\n")
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                         text=True, bufsize=1)
        threading.Thread(target=self._drain, daemon=True, name=f"drain-{self.label}").start()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerError(f"the {self.label} server was not ready after {timeout:.0f} s")
            try:
                line = self.lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait()
                raise ServerError(f"the {self.label} server exited with code {code} before it was ready")
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "ready":
                self.ready = event
                return event

    def stop(self) -> int | None:
        """SIGINT, then SIGTERM, then SIGKILL; returns the exit code."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        for send, wait in ((lambda: proc.send_signal(signal.SIGINT), 20), (proc.terminate, 10), (proc.kill, 10)):
            with contextlib.suppress(ProcessLookupError):
                send()
            try:
                return proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        return proc.poll()


class ServerError(RuntimeError):
    pass


def log_tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(can not read {path}: {e})"


# ------------------------------------------------------------------ clients

async def one_request(client, url: str, model: str, prompt, max_tokens: int) -> dict:
    """Streams one completion; returns its timings (perf_counter seconds) and counts, or an error."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    rec = {"max_tokens": max_tokens, "send": time.perf_counter(), "first": None, "last": None, "end": None,
           "completion_tokens": None, "prompt_tokens": None, "chunks": 0, "finish_reason": None, "error": None}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                rec["error"] = f"HTTP {response.status_code}: {text[:300]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    event = json.loads(data)
                    if "error" in event:
                        err = event["error"]
                        rec["error"] = str(err.get("message", err) if isinstance(err, dict) else err)[:300]
                        continue
                    choice = (event.get("choices") or [{}])[0]
                    if choice.get("text"):
                        rec["chunks"] += 1
                        rec["first"] = rec["first"] or now
                        rec["last"] = now
                    if choice.get("finish_reason"):
                        rec["finish_reason"] = choice["finish_reason"]
                    if event.get("usage"):
                        rec["completion_tokens"] = event["usage"]["completion_tokens"]
                        rec["prompt_tokens"] = event["usage"]["prompt_tokens"]
    except (httpx.HTTPError, ValueError, KeyError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    rec["end"] = time.perf_counter()
    if rec["error"] is None and rec["completion_tokens"] is None:
        rec["error"] = "the stream ended without usage"
    return rec


async def run_clients(url: str, model: str, prompts: list, plan: list[tuple[int, int]], clients: int,
                      timeout: float) -> list[dict]:
    """``clients`` closed-loop clients working through ``plan``; returns one record per request, in plan order."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    records: list[dict | None] = [None] * len(plan)
    next_index = 0

    async def worker(client):
        nonlocal next_index
        while next_index < len(plan):
            i = next_index
            next_index += 1
            p, n = plan[i]
            rec = await one_request(client, url, model, prompts[p], n)
            rec["prompt_index"] = p
            records[i] = rec

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(min(clients, len(plan)))))
    return records


def warm_up_plan(prompts: list, kind: str, max_tokens: int) -> list[tuple[int, int]]:
    """The warm-up's requests: every prompt (each prompt bucket's prefill compiles on its first use) and, for
    'lengths', every max_tokens in 1..max_tokens."""
    if kind == "prompts":
        return [(i, 2) for i in range(len(prompts))]
    return [(i % len(prompts), i % max_tokens + 1) for i in range(max(len(prompts), max_tokens))]


async def warm_up(url: str, model: str, prompts: list, plan: list[tuple[int, int]], max_batch: int,
                  timeout: float) -> list[str]:
    """Runs the warm-up plan with ``max_batch`` clients; returns the errors."""
    records = await run_clients(url, model, prompts, plan, max_batch, timeout)
    return [r["error"] for r in records if r["error"]]


async def scrape_metrics(url: str) -> dict[str, float]:
    """The server's /metrics as {name: value} (unlabelled samples only)."""
    try:
        async with httpx.AsyncClient(timeout=30.0) as client:
            response = await client.get(f"{url}/metrics")
            response.raise_for_status()
    except httpx.HTTPError as e:
        raise ServerError(f"GET {url}/metrics failed ({type(e).__name__}: {e}); has the server died?") from None
    out = {}
    for line in response.text.splitlines():
        if line.startswith("#") or "{" in line:
            continue
        parts = line.split()
        if len(parts) == 2:
            with contextlib.suppress(ValueError):
                out[parts[0]] = float(parts[1])
    return out


# ------------------------------------------------------------------ statistics

def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between order statistics; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _dist(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99),
            "mean": sum(values) / len(values) if values else None, "n": len(values)}


def summarize(records: list[dict], before: dict, after: dict) -> dict:
    ok = [r for r in records if r["error"] is None]
    start = min(r["send"] for r in records)
    wall = max(r["end"] for r in records) - start
    tokens = sum(r["completion_tokens"] for r in ok)
    ttft = [r["first"] - r["send"] for r in ok if r["first"] is not None]
    itl = [(r["last"] - r["first"]) / (r["completion_tokens"] - 1) for r in ok
           if r["first"] is not None and r["completion_tokens"] > 1]
    e2e = [r["end"] - r["send"] for r in ok]
    d_sum = after.get("eagle3_acceptance_length_sum", 0.0) - before.get("eagle3_acceptance_length_sum", 0.0)
    d_count = after.get("eagle3_acceptance_length_count", 0.0) - before.get("eagle3_acceptance_length_count", 0.0)
    per_request = [{"prompt_index": r["prompt_index"], "max_tokens": r["max_tokens"],
                    "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                    "finish_reason": r["finish_reason"], "chunks": r["chunks"],
                    "start_s": r["send"] - start, "ttft_s": None if r["first"] is None else r["first"] - r["send"],
                    "e2e_s": r["end"] - r["send"], "error": r["error"]} for r in records]
    short = sum(1 for r in ok if r["completion_tokens"] != r["max_tokens"])
    return {"requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
            "short_completions": short, "wall_s": wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall if wall > 0 else None,
            "requests_per_s": len(ok) / wall if wall > 0 else None,
            "ttft_s": _dist(ttft), "itl_s": _dist(itl), "e2e_s": _dist(e2e),
            "acceptance_length": d_sum / d_count if d_count > 0 else None, "target_forwards": d_count,
            "server_generated_tokens": after.get("eagle3_generation_tokens_total", 0.0)
            - before.get("eagle3_generation_tokens_total", 0.0),
            "per_request": per_request}


# ------------------------------------------------------------------ tables

def _fmt(x, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def results_table(configs: list[dict]) -> str:
    header = ["mode", "admission", "clients", "reqs", "err", "tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms",
              "ITL p50 ms", "ITL p99 ms", "E2E p50 s", "E2E p99 s", "accept len"]
    rows = []
    for c in configs:
        rows.append([c["mode"], c["admission"], str(c["clients"]), str(c["requests"]), str(c["errors"]),
                     _fmt(c["output_tokens_per_s"]), _fmt(c["requests_per_s"], digits=2),
                     _fmt(c["ttft_s"]["p50"], 1e3), _fmt(c["ttft_s"]["p99"], 1e3),
                     _fmt(c["itl_s"]["p50"], 1e3), _fmt(c["itl_s"]["p99"], 1e3),
                     _fmt(c["e2e_s"]["p50"], digits=2), _fmt(c["e2e_s"]["p99"], digits=2),
                     _fmt(c["acceptance_length"], digits=2)])
    return _table(header, rows)


def ratios(configs: list[dict]) -> list[dict]:
    """continuous/static (same mode and clients) and spec/plain (same admission and clients) throughput ratios."""
    by = {(c["mode"], c["admission"], c["clients"]): c for c in configs}
    out = []
    for (mode, admission, clients), c in by.items():
        pairs = []
        if admission == "continuous" and (mode, "static", clients) in by:
            pairs.append(("continuous / static", f"mode {mode}", by[(mode, "static", clients)]))
        if mode == "spec" and ("plain", admission, clients) in by:
            pairs.append(("spec / plain", f"admission {admission}", by[("plain", admission, clients)]))
        for name, fixed, base in pairs:
            a, b = c["output_tokens_per_s"], base["output_tokens_per_s"]
            e2e_a, e2e_b = c["e2e_s"]["p50"], base["e2e_s"]["p50"]
            out.append({"ratio": name, "fixed": fixed, "clients": clients, "tok_s": a, "base_tok_s": b,
                        "throughput_ratio": a / b if a and b else None,
                        "e2e_p50_ratio": e2e_a / e2e_b if e2e_a and e2e_b else None})
    order = {"continuous / static": 0, "spec / plain": 1}
    return sorted(out, key=lambda r: (order[r["ratio"]], r["fixed"], r["clients"]))


def ratios_table(rows: list[dict]) -> str:
    header = ["ratio", "same", "clients", "tok/s", "base tok/s", "throughput x", "E2E p50 x"]
    body = [[r["ratio"], r["fixed"], str(r["clients"]), _fmt(r["tok_s"]), _fmt(r["base_tok_s"]),
             _fmt(r["throughput_ratio"], digits=2), _fmt(r["e2e_p50_ratio"], digits=2)] for r in rows]
    return _table(header, body)


# ------------------------------------------------------------------ main

def machine_info() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    with contextlib.suppress(AttributeError, OSError):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        info["load_average"] = list(os.getloadavg())
    for pkg in ("eagle3_jax", "jax", "jaxlib", "uvicorn", "fastapi"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[f"{pkg}_version"] = importlib.metadata.version(pkg)
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["httpx_version"] = f"{httpx.__name__} {importlib.metadata.version(httpx.__name__)}"
    return info


def server_command(args, mode: str, admission: str) -> list[str]:
    cmd = [sys.executable, "-m", "eagle3_jax", "serve", "--target", args.target, "--port", "0", "--json",
           "--max-batch", str(args.max_batch), "--max-cache-len", str(args.max_cache_len),
           "--admission", admission, "--chunk", str(args.chunk)]
    if mode == "spec":
        cmd += ["--draft", args.draft]
        if args.tree:
            d, k, n = args.tree.split(",")
            cmd += ["--num-steps", d, "--tree-topk", k, "--num-draft-tokens", n]
    return cmd + list(args.server_arg)


def resolve(args, parser) -> None:
    """Fills in the demo pair, the modes and the prompts; exits on inconsistent options."""
    if args.target is None:
        from eagle3_jax.demo import demo_paths  # a path lookup: imports no JAX

        args.target, demo_head = demo_paths("toy")
        args.demo = True
        if args.draft is None and not args.no_draft:
            args.draft = demo_head
            if args.tree is None:
                args.tree = DEMO_TREE
    else:
        args.demo = False
    if args.no_draft:
        args.draft = None
        args.modes = [m for m in args.modes if m != "spec"] or ["plain"]
    if "spec" in args.modes and args.draft is None:
        parser.error("the spec mode needs --draft (or use --modes plain / --no-draft)")
    if not 1 <= args.min_tokens <= args.max_tokens:
        parser.error("need 1 <= --min-tokens <= --max-tokens")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be positive")
    if args.max_batch < 1 or args.chunk < 1 or args.max_cache_len < 2:
        parser.error("--max-batch and --chunk must be positive, --max-cache-len at least 2")
    if args.max_tokens >= args.max_cache_len:
        parser.error("--max-tokens must be below --max-cache-len (the prompt shares the KV cache)")


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    resolve(args, parser)
    prompts = load_prompts(args.prompts, args.num_prompts) if args.prompts else list(DEMO_PROMPTS)
    if args.server_log:
        log_path = os.path.abspath(args.server_log)
        open(log_path, "w").close()
    else:
        fd, log_path = tempfile.mkstemp(prefix="bench_serve_", suffix=".log")
        os.close(fd)
    plans = {n: make_plan(prompts, args.requests or max(2 * n, 8), n, args) for n in args.clients}
    print(f"target {args.target}" + (f", draft {args.draft}" if "spec" in args.modes else "")
          + (f", tree {args.tree}" if args.tree and "spec" in args.modes else "")
          + f"; batch {args.max_batch}, cache {args.max_cache_len}, chunk {args.chunk}; "
          f"max_tokens {args.min_tokens}..{args.max_tokens}; {len(prompts)} prompts; server log {log_path}",
          file=sys.stderr, flush=True)

    # SIGTERM unwinds like Ctrl-C, so that the finally below stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    configs: list[dict] = []
    servers: list[dict] = []
    server: ServerProcess | None = None
    t_start = time.perf_counter()
    try:
        for mode in args.modes:
            for admission in args.admission:
                label = f"{mode}/{admission}"
                server = ServerProcess(server_command(args, mode, admission), log_path, label)
                t0 = time.perf_counter()
                print(f"[{label}] starting the server...", file=sys.stderr, flush=True)
                ready = server.start(args.ready_timeout)
                startup = time.perf_counter() - t0
                url, model = ready["url"], ready["model"]
                if ready.get("speculative") != (mode == "spec"):
                    raise ServerError(f"the {label} server reports speculative={ready.get('speculative')}")
                t0 = time.perf_counter()
                warm_plan = warm_up_plan(prompts, args.warmup, args.max_tokens)
                errors = asyncio.run(warm_up(url, model, prompts, warm_plan, args.max_batch,
                                             args.request_timeout))
                if errors:
                    raise ServerError(f"the {label} server's warm-up failed: {errors[0]}")
                warm = time.perf_counter() - t0
                servers.append({"mode": mode, "admission": admission, "command": server.cmd, "ready": ready,
                                "startup_s": startup, "warmup_s": warm, "warmup_requests": len(warm_plan)})
                print(f"[{label}] ready in {startup:.1f} s, warm-up ({len(warm_plan)} requests) {warm:.1f} s",
                      file=sys.stderr, flush=True)
                for clients in args.clients:
                    plan = plans[clients]
                    before = asyncio.run(scrape_metrics(url))
                    records = asyncio.run(run_clients(url, model, prompts, plan, clients, args.request_timeout))
                    after = asyncio.run(scrape_metrics(url))
                    summary = summarize(records, before, after)
                    configs.append({"mode": mode, "admission": admission, "clients": clients, **summary})
                    accept = summary["acceptance_length"]
                    print(f"[{label}] clients {clients:3d}: {summary['requests']} requests "
                          f"({summary['errors']} failed) in {summary['wall_s']:.1f} s, "
                          f"{_fmt(summary['output_tokens_per_s'])} tok/s, "
                          f"TTFT p50 {_fmt(summary['ttft_s']['p50'], 1e3)} ms, "
                          f"accept len {_fmt(accept, digits=2)}", file=sys.stderr, flush=True)
                    if summary["errors"]:
                        first = next(r["error"] for r in summary["per_request"] if r["error"])
                        print(f"[{label}]   first error: {first}", file=sys.stderr, flush=True)
                code = server.stop()
                servers[-1]["exit_code"] = code
                server = None
    except ServerError as e:
        print(f"error: {e}\n--- last lines of the server log {log_path}:\n{log_tail(log_path)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; server log: {log_path}", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            server.stop()
    total = time.perf_counter() - t_start

    ratio_rows = ratios(configs)
    print(f"\nServing {os.path.basename(os.path.normpath(args.target))} "
          f"(batch {args.max_batch}, cache {args.max_cache_len}, chunk {args.chunk}; "
          f"{args.min_tokens}-{args.max_tokens} tokens per request, greedy, ignore_eos). "
          "ITL: per-token average over a request's stream (chunks carry several tokens).\n")
    print(results_table(configs))
    if ratio_rows:
        print("\nRatios (measured in this run; > 1: the first is faster; E2E: < 1 is the first one quicker):\n")
        print(ratios_table(ratio_rows))
    failed = sum(c["errors"] for c in configs)
    if failed:
        print(f"\n{failed} requests failed; see the JSON's per_request errors and the server log {log_path}")
    print(f"\ntotal {total:.0f} s")

    if args.out:
        settings = {k: v for k, v in vars(args).items()}
        result = {"benchmark": "serve", "settings": settings, "machine": machine_info(), "prompts": prompts,
                  "servers": servers, "configs": configs, "ratios": ratio_rows, "total_s": total,
                  "server_log": log_path}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
