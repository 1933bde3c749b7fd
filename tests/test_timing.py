"""eagle3_jax.timing: paired ratios, their spread, the noise rule and interleaved order."""

import math

import pytest

from eagle3_jax.timing import Ratio, interleaved, paired_speedup


def test_ratio_median_low_high():
    r = Ratio.of([1.9, 1.7, 2.4, 1.8, 1.75])
    assert (r.median, r.low, r.high) == (1.8, 1.7, 2.4)
    assert r.samples == (1.9, 1.7, 2.4, 1.8, 1.75)  # in the order measured
    even = Ratio.of([1.0, 4.0, 2.0, 3.0])
    assert even.median == 2.5 and (even.low, even.high) == (1.0, 4.0)
    assert all(isinstance(s, float) for s in Ratio.of([1, 2]).samples)


def test_ratio_needs_a_sample():
    with pytest.raises(ValueError, match="at least one sample"):
        Ratio.of([])


@pytest.mark.parametrize("samples, noise", [
    ([1.2, 1.5, 1.3], False),   # all faster
    ([0.7, 0.9, 0.8], False),   # all slower: a clear slowdown is not noise
    ([0.9, 1.2, 1.1], True),    # the repeats straddle 1.0
    ([1.0, 1.3], False),        # touching 1.0 is not straddling it
    ([0.8, 1.0], False),
    ([2.0], True),              # one repeat can not show its spread
])
def test_noise_rule(samples, noise):
    assert Ratio.of(samples).noise is noise


def test_describe_and_json():
    clear = Ratio.of([1.71, 1.84, 1.93])
    assert clear.describe() == "1.84x (1.71-1.93 over 3 repeats)"
    assert "noise" not in clear.describe()
    noisy = Ratio.of([0.9, 1.1, 1.05])
    assert noisy.describe().startswith("1.05x (0.90-1.10 over 3 repeats)") and "noise" in noisy.describe()
    assert "one repeat" in Ratio.of([1.5]).describe() and "noise" in Ratio.of([1.5]).describe()
    assert clear.describe(unit=" times").startswith("1.84 times")
    assert clear.to_json() == {"median": 1.84, "low": 1.71, "high": 1.93, "samples": [1.71, 1.84, 1.93],
                               "noise": False}


def test_interleaved_alternates_the_order():
    calls = []

    def run(name):
        def f():
            calls.append(name)
            return name.upper()
        return f

    out = interleaved({"a": run("a"), "b": run("b")}, repeats=4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert list(out) == ["a", "b"]
    assert [result for result, _ in out["a"]] == ["A"] * 4 and [result for result, _ in out["b"]] == ["B"] * 4
    assert all(seconds >= 0 for rows in out.values() for _, seconds in rows)
    calls.clear()
    interleaved({"a": run("a"), "b": run("b"), "c": run("c")}, repeats=2)
    assert calls == ["a", "b", "c", "c", "b", "a"]


def test_interleaved_times_each_call(monkeypatch):
    clock = iter([0.0, 1.0, 1.0, 3.0, 3.0, 7.0, 7.0, 8.0])  # a: 1 s, b: 2 s; then b: 4 s, a: 1 s
    monkeypatch.setattr("eagle3_jax.timing.time.perf_counter", lambda: next(clock))
    out = interleaved({"a": lambda: None, "b": lambda: None}, repeats=2)
    assert [s for _, s in out["a"]] == [1.0, 1.0] and [s for _, s in out["b"]] == [2.0, 4.0]


def test_interleaved_needs_a_repeat():
    with pytest.raises(ValueError, match="at least 1"):
        interleaved({"a": lambda: None}, repeats=0)


def test_paired_speedup_math():
    # tokens/s: base 100, 50, 100; candidate 200, 200, 150 -> ratios 2.0, 4.0, 1.5
    base = [(100, 1.0), (100, 2.0), (50, 0.5)]
    cand = [(100, 0.5), (200, 1.0), (75, 0.5)]
    r = paired_speedup(base, cand)
    assert r.samples == pytest.approx((2.0, 4.0, 1.5))
    assert r.median == pytest.approx(2.0) and r.low == pytest.approx(1.5) and r.high == pytest.approx(4.0)
    assert not r.noise
    # ratios are of throughput, so unequal token counts are accounted for
    assert paired_speedup([(10, 1.0)], [(20, 1.0)]).median == pytest.approx(2.0)
    # a slower candidate gives ratios below 1
    assert paired_speedup([(10, 1.0), (10, 1.0)], [(10, 2.0), (10, 4.0)]).median == pytest.approx(0.375)


def test_paired_speedup_errors_and_skipped_pairs():
    with pytest.raises(ValueError, match="same number of repeats"):
        paired_speedup([(1, 1.0)], [(1, 1.0), (1, 1.0)])
    # a repeat that produced nothing, or took no measurable time, gives no ratio
    r = paired_speedup([(0, 1.0), (10, 0.0), (10, 1.0), (10, 1.0), (10, 1.0)],
                       [(10, 1.0), (10, 1.0), (10, 0.0), (10, 0.5), (10, math.nan)])
    assert r.samples == (2.0,)
    with pytest.raises(ValueError, match="no repeat gave a ratio"):
        paired_speedup([(0, 1.0)], [(5, 1.0)])
    with pytest.raises(ValueError, match="no repeat gave a ratio"):
        paired_speedup([], [])
    with pytest.raises(ValueError, match="no repeat gave a ratio"):
        paired_speedup([(10, math.inf)], [(10, 1.0)])
