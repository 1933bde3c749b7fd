"""The server's ``/metrics``, in the Prometheus text exposition format (version 0.0.4).

Counters and histograms are kept here, under one lock; the engine's gauges
(queue depth, running rows, batch occupancy) are read when the page is
rendered. Names start with ``eagle3_``.
"""

from __future__ import annotations

import bisect
import collections
import threading
from collections.abc import Sequence

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative buckets, a sum and a count (Prometheus's histogram)."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else _num(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Metrics:
    """What ``/metrics`` reports.

    Args:
      max_accept: the longest acceptance length a forward can have (tree depth + 1; 1 for plain decoding).
      engine: the :class:`~eagle3_jax.serve.engine.BatchEngine` whose gauges are read.
      window: seconds over which ``eagle3_generation_tokens_per_second`` is averaged.
    """

    def __init__(self, engine, max_accept: int, window: float = 10.0):
        self.engine = engine
        self.lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.rejected = 0
        self.acceptance = Histogram(tuple(range(1, max_accept + 1)))
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.window = window

    def request_done(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, str(status))] += 1

    def finished(self, prompt_tokens: int, completion_tokens: int, accept_lengths: Sequence[int],
                 ttft: float, total: float) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            for a in accept_lengths:
                self.acceptance.observe(a)
            self.ttft.observe(ttft)
            self.e2e.observe(total)

    def render(self) -> str:
        engine = self.engine
        with self.lock:
            rate = engine.tokens_per_second(self.window)
            lines = ["# HELP eagle3_requests_total HTTP requests answered, by endpoint and status code.",
                     "# TYPE eagle3_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'eagle3_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            running = engine.running()
            gauges = [
                ("queue_depth", "Requests waiting for a batch row.", engine.queue_depth()),
                ("running_requests", "Requests decoding in a batch row.", running),
                ("batch_rows", "Batch rows (--max-batch).", engine.max_batch),
                ("batch_occupancy", "Fraction of the batch rows in use.", running / engine.max_batch),
                ("generation_tokens_per_second", f"Tokens generated per second over the last {self.window:g} s.",
                 rate),
            ]
            for name, help_text, value in gauges:
                lines += [f"# HELP eagle3_{name} {help_text}", f"# TYPE eagle3_{name} gauge",
                          f"eagle3_{name} {_num(value)}"]
            counters = [("prompt_tokens_total", "Prompt tokens of finished requests.", self.prompt_tokens),
                        ("generation_tokens_total", "Tokens generated for finished requests.",
                         self.completion_tokens),
                        ("rejected_requests_total", "Requests refused with 503 (queue full).", self.rejected)]
            for name, help_text, value in counters:
                lines += [f"# HELP eagle3_{name} {help_text}", f"# TYPE eagle3_{name} counter",
                          f"eagle3_{name} {value}"]
            histograms = [("acceptance_length", "Tokens committed per target forward (speculative: accepted "
                           "draft tokens + 1).", self.acceptance),
                          ("time_to_first_token_seconds", "From request to first token.", self.ttft),
                          ("request_seconds", "From request to its last token.", self.e2e)]
            for name, help_text, hist in histograms:
                lines += [f"# HELP eagle3_{name} {help_text}", f"# TYPE eagle3_{name} histogram"]
                lines += hist.lines(f"eagle3_{name}")
        return "\n".join(lines) + "\n"
