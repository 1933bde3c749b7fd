"""Sampling settings at the edges of float32: a temperature or top-p too small for float32 is its limit
(greedy decoding, the top token alone), never silently wrong tokens; huge temperatures stay finite. The
same in the Python API (here), the CLI (which builds a SamplingParams) and the server (tests/test_serve.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eagle3_jax import Generator, InputError, SamplingParams, load_target
from eagle3_jax.decoding.common import RuntimeParams
from eagle3_jax.demo import demo_paths
from eagle3_jax.sampling import MAX_TEMPERATURE, MIN_NORMAL, filter_logits

tiny = st.sampled_from([5e-324, 1e-320, 1e-310, 1e-45, 1e-40, 1.1e-38, MIN_NORMAL, 2e-38, 1e-37, 1e-30, 1e-20]) | \
    st.floats(min_value=0.0, max_value=1e-20, allow_subnormal=True)
huge = st.sampled_from([1e3, 1e10, 1e30, 1e38, MAX_TEMPERATURE]) | st.floats(min_value=1e3, max_value=MAX_TEMPERATURE)


def probabilities(logits, temperature, top_p=1.0, top_k=0):
    return np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(logits, jnp.float32), jnp.float32(temperature),
                                                   jnp.float32(top_p), top_k), axis=-1))


@settings(max_examples=60, deadline=None)
@given(t=tiny, seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 30.0, 1e4]))
def test_a_tiny_temperature_is_greedy_or_its_limit(t, seed, scale):
    logits = np.random.default_rng(seed).normal(size=(2, 64)).astype(np.float32) * scale
    params = SamplingParams(temperature=t)
    if np.float32(t) < MIN_NORMAL:  # zero or subnormal in float32: greedy decoding, the limit
        assert params.greedy and params.temperature == 0.0
        assert RuntimeParams.per_row([t], [1.0], [0], [[]], [4]).rows.greedy.tolist() == [True]
        return
    assert not params.greedy
    p = probabilities(logits, params.temperature)
    assert np.all(np.isfinite(p)) and np.allclose(p.sum(-1), 1.0, atol=1e-5)
    top = np.sort(logits, axis=-1)
    if np.all(top[:, -1] - top[:, -2] > 1e-3 * scale):  # a clear maximum: all the mass on it
        np.testing.assert_array_equal(p.argmax(-1), logits.argmax(-1))
        np.testing.assert_allclose(p.max(-1), 1.0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(t=huge, seed=st.integers(0, 2**16))
def test_a_huge_temperature_stays_finite(t, seed):
    logits = np.random.default_rng(seed).normal(size=(1, 64)).astype(np.float32) * 10
    p = probabilities(logits, SamplingParams(temperature=t).temperature)
    assert np.all(np.isfinite(p)) and np.allclose(p.sum(), 1.0, atol=1e-5)
    if t >= 1e6:
        np.testing.assert_allclose(p, 1 / 64, rtol=1e-3)  # the limit: uniform
    with pytest.raises(InputError, match="temperature must be <="):
        SamplingParams(temperature=1e39)  # infinite in float32


@settings(max_examples=40, deadline=None)
@given(top_p=tiny.filter(lambda x: x > 0), seed=st.integers(0, 2**16))
def test_a_tiny_top_p_keeps_the_top_token(top_p, seed):
    logits = np.random.default_rng(seed).normal(size=(3, 64)).astype(np.float32)
    p = probabilities(logits, 1.0, top_p=top_p)
    assert np.all(np.isfinite(p)) and (p > 0).sum(-1).tolist() == [1, 1, 1]
    np.testing.assert_array_equal(p.argmax(-1), logits.argmax(-1))


def test_generation_at_the_limits_gives_the_greedy_tokens():
    """The Generator's scalar settings (the server's per-row ones, with speculative decoding, are checked on
    the live server in tests/test_serve.py)."""
    gen = Generator(load_target(demo_paths("toy")[0]), max_cache_len=96)
    prompt = "def fibonacci(n):"
    [greedy] = gen.generate(prompt, max_new_tokens=24)
    for sampling in (SamplingParams(temperature=1e-40),  # float32 0: the greedy program
                     SamplingParams(temperature=1e-30),  # a sampling program at a normal, tiny temperature
                     SamplingParams(temperature=1.0, top_p=1e-45)):  # top-p below every probability: the top token
        [out] = gen.generate(prompt, max_new_tokens=24, sampling=sampling, seed=3)
        assert out.token_ids == greedy.token_ids, sampling
