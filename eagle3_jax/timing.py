"""Speed comparisons that mean something on a busy machine.

A speedup measured by timing one method, then the other, absorbs whatever
else the machine did in between: on a shared 2-core CPU the same demo gave
1.26x, 4.28x and 0.29x in three runs. The rules here:

- the methods run *interleaved*, repeat by repeat, in alternating order
  (A B, then B A, ...), so slow drift of the machine hits both alike;
- every repeat gives one paired ratio, and the figure reported is the
  *median* of the ratios with their spread (lowest and highest);
- a ratio whose spread reaches both sides of 1.0 is called *noise*: the
  measurement can not tell which method is faster.

The functions are plain Python; what they time is up to the caller (a
``Generator.generate`` call, a batch of prompts, ...).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Ratio:
    """The median of paired ratios (e.g. speculative tokens/s over plain tokens/s) and their spread."""

    median: float
    low: float
    high: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Ratio:
        if not samples:
            raise ValueError("a ratio needs at least one sample")
        values = tuple(float(s) for s in samples)
        return cls(median=statistics.median(values), low=min(values), high=max(values), samples=values)

    @property
    def noise(self) -> bool:
        """True when the repeats disagree on which side of 1.0 the ratio lies (or there is a single repeat)."""
        return len(self.samples) < 2 or (self.low < 1.0 < self.high)

    def describe(self, unit: str = "x") -> str:
        """E.g. ``1.84x (1.71-1.93 over 5 repeats)``, with ``; noise: ...`` appended when it is noise."""
        text = f"{self.median:.2f}{unit} ({self.low:.2f}-{self.high:.2f} over {len(self.samples)} repeats)"
        if len(self.samples) < 2:
            return f"{self.median:.2f}{unit} (one repeat; noise: repeat to tell)"
        if self.noise:
            text += "; noise: the repeats do not agree which is faster"
        return text

    def to_json(self) -> dict:
        return {"median": self.median, "low": self.low, "high": self.high, "samples": list(self.samples),
                "noise": self.noise}


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[tuple[object, float]]]:
    """Runs every callable ``repeats`` times, interleaved in alternating order; returns (result, seconds) per run.

    Warm-up (compilation) is the caller's business: run each once before.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    names = list(runs)
    out: dict[str, list[tuple[object, float]]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            result = runs[name]()
            out[name].append((result, time.perf_counter() - t0))
    return out


def paired_speedup(baseline: Sequence[tuple[int, float]], candidate: Sequence[tuple[int, float]]) -> Ratio:
    """Speedup of ``candidate`` over ``baseline`` in tokens/s, from paired (tokens, seconds) repeats."""
    if len(baseline) != len(candidate):
        raise ValueError("the two methods need the same number of repeats")
    ratios = []
    for (n_base, s_base), (n_cand, s_cand) in zip(baseline, candidate):
        # A repeat with no baseline tokens, or a time that is not a positive finite number, gives no ratio.
        if not (n_base > 0 and 0 < s_base < math.inf and 0 < s_cand < math.inf and 0 <= n_cand < math.inf):
            continue
        ratios.append((n_cand / s_cand) / (n_base / s_base))
    if not ratios:
        raise ValueError("no repeat gave a ratio: a speedup needs at least one sample with baseline tokens and "
                         "positive, finite times")
    return Ratio.of(ratios)
