"""Plain generation under jit: HF token identity, stop rules, buckets, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_greedy
from flax import nnx

from eagle3_jax import Generator, InputError, SamplingParams, load_target
from eagle3_jax.decoding import plain
from eagle3_jax.decoding.common import DecodeSettings, RuntimeParams
from eagle3_jax.planning import bucket_length
from eagle3_jax.sampling import filter_logits


@pytest.fixture(scope="module")
def qwen3(hf_qwen3):
    return load_target(hf_qwen3.path, dtype="float32", progress=False)


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(6, vocab, size=n).tolist() for n in lengths]  # ids >= 6 avoid the eos id 5


@pytest.mark.parametrize("fixture", ["hf_qwen3", pytest.param("hf_qwen3_tied", marks=pytest.mark.slow),
                                     pytest.param("hf_qwen2", marks=pytest.mark.slow)])
def test_greedy_batch_equals_hf_generate(fixture, request):
    hf = request.getfixturevalue(fixture)
    model = load_target(hf.path, dtype="float32", progress=False)
    prompts = _prompts(97, [3, 11, 1, 7])
    outs = Generator(model).generate(prompts, max_new_tokens=20, stop_token_ids=())
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf.model, p, 20), p
        assert out.finish_reason == "length" and out.num_target_forwards == 19


@pytest.mark.slow
def test_stops_at_eos_like_hf(hf_qwen3, qwen3):
    """Pick as stop id a token the model does emit, so some rows stop early."""
    prompts = _prompts(97, [4, 9, 2, 6], seed=1)
    free = Generator(qwen3).generate(prompts, max_new_tokens=16, stop_token_ids=())
    stop = free[0].token_ids[5]
    outs = Generator(qwen3).generate(prompts, max_new_tokens=16, stop_token_ids=[stop])
    for p, f, out in zip(prompts, free, outs):
        ref = hf_greedy(hf_qwen3.model, p, 16, [stop])
        assert out.token_ids == ref
        if stop in f.token_ids:
            assert out.finish_reason == "eos" and out.token_ids[-1] == stop
            assert out.token_ids == f.token_ids[: f.token_ids.index(stop) + 1]
            assert out.num_target_forwards == len(out.token_ids) - 1
        else:
            assert out.finish_reason == "length"
    assert outs[0].finish_reason == "eos" and len(outs[0].token_ids) <= 6


@pytest.mark.slow
def test_default_stop_ids_are_the_config_eos(qwen3):
    assert qwen3.config.eos_token_ids == (5,)
    out = Generator(qwen3).generate([[7, 8, 9]], max_new_tokens=4, stop_token_ids=None)[0]
    free = Generator(qwen3).generate([[7, 8, 9]], max_new_tokens=4, stop_token_ids=())[0]
    if 5 in free.token_ids:
        assert out.finish_reason == "eos"
    else:
        assert out.token_ids == free.token_ids


@pytest.mark.slow
def test_full_cache_stops_cleanly(hf_qwen3, qwen3):
    prompts = _prompts(97, [10, 3])
    outs = Generator(qwen3, max_cache_len=16).generate(prompts, max_new_tokens=40, stop_token_ids=())
    for p, out in zip(prompts, outs):
        assert len(p) + len(out.token_ids) == 16
        assert out.finish_reason == "length"
        assert out.token_ids == hf_greedy(hf_qwen3.model, p, 40)[: 16 - len(p)]


def test_prompt_longer_than_cache_is_an_error(qwen3):
    with pytest.raises(InputError, match="a prompt of 16 tokens does not fit in a KV cache of 16 slots"):
        Generator(qwen3, max_cache_len=16).generate([list(range(6, 22))], max_new_tokens=4)
    with pytest.raises(InputError, match="exceeds the model's context"):
        Generator(qwen3).generate([[7] * 512], max_new_tokens=4)


@pytest.mark.parametrize("prompts, message", [
    ([], "no prompts"),
    ([[1, 2], []], "prompt 1 is empty"),
    ([[1, 97]], r"outside the vocabulary \[0, 97\): \[97\]"),
    ([[-1]], "outside the vocabulary"),
])
def test_bad_prompts(qwen3, prompts, message):
    with pytest.raises(InputError, match=message):
        Generator(qwen3).generate(prompts)


def test_bad_knobs(qwen3):
    with pytest.raises(InputError, match="max_new_tokens"):
        Generator(qwen3).generate([[7]], max_new_tokens=0)
    with pytest.raises(InputError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(InputError, match="temperature"):
        SamplingParams(temperature=-1.0)


@pytest.mark.slow
def test_same_bucket_does_not_recompile(qwen3):
    gen = Generator(qwen3)
    gen.generate(_prompts(97, [17, 20]), max_new_tokens=5)
    before = gen.num_compiles
    assert bucket_length(17) == bucket_length(30) == 32
    outs = gen.generate(_prompts(97, [30, 25], seed=5), max_new_tokens=5)
    assert gen.num_compiles == before
    assert outs[0].compile_seconds == 0.0
    gen.generate(_prompts(97, [33, 2]), max_new_tokens=5)  # next bucket: compiles
    assert gen.num_compiles > before


@pytest.mark.slow
def test_what_a_call_varies_compiles_nothing(qwen3):
    """max_new_tokens, the batch size within its bucket, greedy or sampling, temperature, top-p, top-k, the
    seed and the stop tokens are runtime values: after the first call none of them compiles a program."""
    gen = Generator(qwen3)
    prompts = _prompts(97, [9, 5, 14, 2])
    [greedy, *_] = gen.generate(prompts, max_new_tokens=40, stop_token_ids=())  # 4 rows, bucket 16, cache 128
    before = gen.num_compiles
    calls = [(3, dict(max_new_tokens=7)),
             (4, dict(max_new_tokens=100, temperature=0.7)),
             (3, dict(max_new_tokens=30, temperature=1.3, top_k=5, seed=4)),
             (4, dict(max_new_tokens=64, temperature=0.5, top_p=0.8, top_k=20)),
             (3, dict(max_new_tokens=12, stop_token_ids=[7, 9])),
             (4, dict(max_new_tokens=40, stop_token_ids=()))]
    for batch, kwargs in calls:
        outs = gen.generate(prompts[:batch], **kwargs)
        assert len(outs) == batch and all(o.compile_seconds == 0.0 for o in outs), kwargs
        assert all(len(o.token_ids) <= kwargs["max_new_tokens"] for o in outs), kwargs
    assert gen.num_compiles == before
    assert outs[0].token_ids == greedy.token_ids  # greedy again, after sampling: the same tokens


@pytest.mark.slow
def test_sampling_is_seeded_and_top_k_1_is_greedy(qwen3):
    gen = Generator(qwen3)
    prompts = _prompts(97, [5, 8])
    s = SamplingParams(temperature=1.5, top_p=0.95)
    a = gen.generate(prompts, max_new_tokens=12, sampling=s, seed=1, stop_token_ids=())
    b = gen.generate(prompts, max_new_tokens=12, sampling=s, seed=1, stop_token_ids=())
    c = gen.generate(prompts, max_new_tokens=12, sampling=s, seed=2, stop_token_ids=())
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    greedy = gen.generate(prompts, max_new_tokens=12, stop_token_ids=())
    topk1 = gen.generate(prompts, max_new_tokens=12, sampling=SamplingParams(temperature=0.7, top_k=1), seed=3,
                         stop_token_ids=())
    assert [o.token_ids for o in greedy] == [o.token_ids for o in topk1]


def _reference_filter(logits, temperature, top_p, top_k):
    """Straightforward NumPy version of HF's temperature -> top-k -> top-p warpers."""
    x = logits / temperature
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x < kth, -np.inf, x)
    order = np.argsort(-x, kind="stable")
    p = np.exp(x[order] - x[order].max())
    p /= p.sum()
    keep = np.zeros_like(x, bool)
    total = 0.0
    for rank, i in enumerate(order):
        keep[i] = True
        total += p[rank]
        if total >= top_p:
            break
    return np.where(keep, x, -np.inf)


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 0.5, 5), (1.0, 1.0, 3),
                                                       (2.0, 0.3, 0)])
def test_filter_logits_matches_reference(temperature, top_p, top_k):
    logits = np.random.default_rng(7).normal(size=(4, 50)).astype(np.float32) * 3
    got = np.asarray(filter_logits(jnp.asarray(logits), jnp.float32(temperature), jnp.float32(top_p), top_k))
    for row in range(4):
        ref = _reference_filter(logits[row].astype(np.float64), temperature, top_p, top_k)
        assert np.array_equal(np.isinf(got[row]), np.isinf(ref))
        np.testing.assert_allclose(got[row][~np.isinf(ref)], ref[~np.isinf(ref)], rtol=1e-6)


def test_per_row_settings_filter_each_row_like_the_reference():
    """One setting per row (the server's batches): temperature, top-p and a traced top-k differ by row."""
    settings = [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 0.5, 5), (1.0, 1.0, 3), (2.0, 0.3, 0), (0.5, 0.8, 50)]
    logits = np.random.default_rng(8).normal(size=(len(settings), 50)).astype(np.float32) * 3
    t, p, k = (jnp.asarray([s[i] for s in settings]) for i in range(3))
    got = np.asarray(filter_logits(jnp.asarray(logits), t.astype(jnp.float32), p.astype(jnp.float32), 0,
                                   k.astype(jnp.int32)))
    for row, (temperature, top_p, top_k) in enumerate(settings):
        ref = _reference_filter(logits[row].astype(np.float64), temperature, top_p, top_k)
        assert np.array_equal(np.isinf(got[row]), np.isinf(ref)), row
        np.testing.assert_allclose(got[row][~np.isinf(ref)], ref[~np.isinf(ref)], rtol=1e-6)


@pytest.mark.slow
def test_pure_generate_runs_under_outer_jit(qwen3):
    """The pure function composes with a user's own jax.jit (model state as an argument)."""
    graphdef, state = nnx.split(qwen3)
    settings = DecodeSettings(max_new_tokens=6, capacity=32, cache_dtype=jnp.dtype(jnp.float32))

    @jax.jit
    def run(state, tokens, lengths):
        model = nnx.merge(graphdef, state)
        return plain.generate(model, tokens, lengths, jax.random.key(0), RuntimeParams.make(), settings)

    prompts = _prompts(97, [4, 7])
    tokens = np.zeros((2, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    result = run(state, jnp.asarray(tokens), jnp.array([4, 7], jnp.int32))
    expected = Generator(qwen3).generate(prompts, max_new_tokens=6, stop_token_ids=())
    for i in range(2):
        assert np.asarray(result.tokens[i]).tolist() == expected[i].token_ids


@pytest.mark.slow
def test_chunked_prefill_equals_one_shot(qwen3):
    """Long prompts are prefilled in chunks; logits, cache and features are those of a single pass."""
    from eagle3_jax.decoding.common import prefill

    rng = np.random.default_rng(3)
    lengths = np.array([50, 17, 64], np.int32)
    tokens = np.zeros((3, 64), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(6, 97, size=n)
    settings = DecodeSettings(max_new_tokens=4, capacity=96, cache_dtype=jnp.dtype(jnp.float32))
    args = (qwen3, jnp.asarray(tokens), jnp.asarray(lengths), settings, (0, 2, 3))
    one_logits, one_cache, one_feats = prefill(*args)
    for chunk in (16, 24):  # 24 does not divide the bucket: the last chunk is padded
        logits, cache, feats = prefill(*args, chunk=chunk)
        np.testing.assert_allclose(logits, one_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(feats, one_feats, rtol=1e-5, atol=1e-5)
        for i, n in enumerate(lengths):
            for got, want in zip(cache.k + cache.v, one_cache.k + one_cache.v):
                np.testing.assert_allclose(got[i, :, :n], want[i, :, :n], rtol=1e-5, atol=1e-5)
        assert cache.lengths.tolist() == lengths.tolist()
