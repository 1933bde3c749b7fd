#!/usr/bin/env python
"""The server against hostile and careless clients: what each maximal request costs the others.

Starts one ``eagle3-jax serve`` process (the toy demo pair by default,
with a ChatML chat template) and, one class at a time, sends the request a
hostile or careless client would: a 50 MB body, a text prompt and a list of
token ids that fill the default body limit (2 MiB), a 20 MB chat message, JSON nested 100,000 deep, a client's own chat
template with nested loops, eight non-streamed clients that give up after
0.5 s, a client that trickles its headers, a tiny temperature. Meanwhile a
thread polls ``GET /health`` every 20 ms and another samples the server's
resident memory (``/proc/PID/status``) every 20 ms, from before the request
until at least 0.3 s after the class began.

Per class: the HTTP status and the seconds until the answer, the worst and
median ``/health`` latency while it ran, the server's memory before and its
peak above that, and what the class is about (rows freed, connection closed,
tokens equal to greedy). Prints a table and writes JSON (--out). Nothing is
asserted: tests/test_serve.py bounds the same classes.

``--repo DIR`` runs the server from another checkout (e.g. a ``git worktree``
of an older commit), so that before and after are measured by the same
script on the same machine:

    python benchmarks/bench_server_limits.py --out bench_out/limits_after.json
    git worktree add /tmp/before 7c3bf52
    python benchmarks/bench_server_limits.py --repo /tmp/before --out bench_out/limits_before.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CLIENT_TEMPLATE = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}x"


class Watch:
    """/health latency and the server's resident memory, sampled from threads while a class runs."""

    def __init__(self, url: str, pid: int, every: float = 0.02):
        self.url, self.pid, self.every = url, pid, every
        self.latencies: list[float] = []
        self.rss: list[float] = []
        self.failures = 0
        self._stop = threading.Event()

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        except (OSError, StopIteration):
            return float("nan")

    def __enter__(self):
        self.before = self.rss_mb()

        def health():
            with httpx.Client(timeout=300) as http:
                while not self._stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        self.failures += http.get(self.url + "/health").status_code != 200
                    except httpx.HTTPError:
                        self.failures += 1
                    self.latencies.append(time.perf_counter() - t0)
                    self._stop.wait(self.every)

        def memory():
            while not self._stop.is_set():
                self.rss.append(self.rss_mb())
                self._stop.wait(self.every)

        self._threads = [threading.Thread(target=health, daemon=True), threading.Thread(target=memory, daemon=True)]
        for t in self._threads:
            t.start()
        while not self.latencies:  # the server answers /health before the class starts
            time.sleep(0.005)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        time.sleep(max(0.0, self.started + 0.3 - time.perf_counter()))  # polls during and just after the class
        self._stop.set()
        for t in self._threads:
            t.join(600)

    def row(self) -> dict:
        lat = self.latencies or [float("nan")]
        return {"health_worst_ms": round(max(lat) * 1000, 1), "health_p50_ms": round(statistics.median(lat) * 1000, 1),
                "health_polls": len(self.latencies), "health_failures": self.failures,
                "rss_before_mb": round(self.before), "rss_peak_growth_mb": round(max(self.rss or [self.before])
                                                                                 - self.before)}


def post(url: str, body: bytes, timeout: float = 600) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=timeout)
        return r.status_code, r.text[:300], time.perf_counter() - t0
    except httpx.HTTPError as e:
        return 0, f"{type(e).__name__}: {e}"[:300], time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=None, help="target directory (default: the toy demo pair's target)")
    p.add_argument("--draft", default=None, help="draft head directory (default: the toy demo pair's head)")
    p.add_argument("--repo", default=None, help="run the server from this checkout (PYTHONPATH), e.g. an older one")
    p.add_argument("--max-cache-len", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.target is None or args.draft is None:
        from eagle3_jax.demo import demo_paths

        target, draft = demo_paths("toy")
        args.target, args.draft = args.target or target, args.draft or draft
    work = tempfile.mkdtemp(prefix="eagle3-jax-bench-limits-")
    template = os.path.join(work, "chatml.jinja")
    with open(template, "w") as f:
        f.write(TEMPLATE)
    env = dict(os.environ)
    if args.repo:
        env["PYTHONPATH"] = os.path.abspath(args.repo)
    log = open(os.path.join(work, "server.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "eagle3_jax", "serve", "--target", args.target, "--draft",
                             args.draft, "--port", "0", "--json", "--max-batch", str(args.max_batch),
                             "--max-cache-len", str(args.max_cache_len), "--chat-template", template,
                             "--served-model-name", "demo", "--warmup-buckets", "16,32,64"],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=work)
    try:
        ready = json.loads(proc.stdout.readline())
    except json.JSONDecodeError:
        log.seek(0)
        print(log.read()[-3000:], file=sys.stderr)
        return 1
    url = ready["url"]
    comp, chat = url + "/v1/completions", url + "/v1/chat/completions"
    rows = []

    def measure(name: str, run) -> None:
        with Watch(url, proc.pid) as watch:
            outcome = run()
        rows.append({"class": name, **outcome, **watch.row()})
        print(f"  {name}: {outcome}", file=sys.stderr, flush=True)

    def body(obj) -> bytes:
        return json.dumps(obj).encode()

    def single(b: bytes, target: str = comp):
        def run():
            status, text, seconds = post(target, b)
            return {"status": status, "seconds": round(seconds, 3), "answer": text[:160]}
        return run

    measure("body of 50 MB", single(body({"model": "demo", "prompt": "x" * 50_000_000})))
    measure("a text prompt of 2 MB (the default body limit)", single(body({"model": "demo",
                                                                           "prompt": "x " * 1_045_000})))
    measure("2 MB of tiny JSON values (1M token ids)", single(body({"model": "demo", "prompt": [1] * 695_000})))
    measure("chat message of 20 MB", single(body({"model": "demo", "messages": [{"role": "user",
                                                                                  "content": "y" * 20_000_000}]}),
                                            chat))
    measure("JSON nested 100,000 deep", single(b'{"model": "demo", "prompt": ' + b"[" * 100_000 + b"]" * 100_000
                                               + b"}"))
    measure("a client's own chat template (10^8 loop steps)",
            single(body({"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                         "chat_template_kwargs": {"chat_template": CLIENT_TEMPLATE}}), chat))

    def impatient():
        long = body({"model": "demo", "prompt": [5, 6, 7], "max_tokens": args.max_cache_len - 4,
                     "temperature": 0, "ignore_eos": True})

        def one():
            try:
                httpx.post(comp, content=long, headers={"Content-Type": "application/json"}, timeout=0.5)
            except httpx.TimeoutException:
                pass

        threads = [threading.Thread(target=one) for _ in range(args.max_batch)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        left = time.perf_counter()
        while time.perf_counter() - left < 120:
            h = httpx.get(url + "/health").json()
            if h.get("running") == 0 and h.get("waiting") == 0:
                break
            time.sleep(0.01)
        freed = time.perf_counter() - left
        status, _, seconds = post(comp, body({"model": "demo", "prompt": [5, 6, 7], "max_tokens": 16,
                                              "temperature": 0}))
        return {"status": status, "seconds": round(seconds, 3),
                "answer": f"rows free {freed:.2f} s after the clients left; a 16-token request then took "
                          f"{seconds:.2f} s"}

    measure(f"{args.max_batch} non-streamed clients leaving after 0.5 s", impatient)

    def trickle():
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host.strip("[]"), int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            s.settimeout(30)
            t0 = time.perf_counter()
            try:
                closed = s.recv(1) == b""
            except TimeoutError:
                closed = False
            seconds = time.perf_counter() - t0
        return {"status": None, "seconds": round(seconds, 3),
                "answer": f"connection closed after {seconds:.1f} s" if closed else "still open after 30 s"}

    measure("headers trickled in", trickle)

    def tiny_temperature():
        def ids(**kw):
            r = httpx.post(comp, json={"model": "demo", "prompt": [5, 6, 7], "max_tokens": 16, "seed": 1,
                                       "return_token_ids": True, **kw}, timeout=60)
            return r.status_code, r.json()["choices"][0].get("token_ids") if r.status_code == 200 else r.text

        greedy, tiny = ids(temperature=0), ids(temperature=1e-40)
        return {"status": tiny[0], "seconds": None,
                "answer": "tokens equal greedy" if tiny == greedy else f"greedy {greedy[1]}, got {tiny[1]}"}

    measure("temperature 1e-40", tiny_temperature)

    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    header = ["class", "status", "seconds", "/health worst ms", "/health p50 ms", "RSS before MB", "RSS peak +MB",
              "outcome"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['class']} | {r['status']} | {r['seconds']} | {r['health_worst_ms']} | {r['health_p50_ms']} | "
              f"{r['rss_before_mb']} | {r['rss_peak_growth_mb']} | {r['answer'][:90]} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "repo": os.path.abspath(args.repo or "."), "target": args.target,
                       "draft": args.draft, "max_cache_len": args.max_cache_len, "max_batch": args.max_batch,
                       "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                   "platform": platform.platform()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
