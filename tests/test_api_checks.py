"""The Python API refuses what it can not honour, instead of coercing it into other tokens."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spec_helpers import random_head, tiny_target

from eagle3_jax import Generator, InputError, SamplingParams
from eagle3_jax.config import Qwen3Config
from eagle3_jax.memory import check_generation_memory
from eagle3_jax.planning import plan_batch
from eagle3_jax.validation import MAX_SEED


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def gen(target):
    return Generator(target)


@pytest.mark.parametrize("prompts, message", [
    ([[1.7, 2.2]], "integer token ids, got 1.7"),
    ([[7, 8.0]], "integer token ids, got 8.0"),
    ([[True, 8]], "integer token ids, got True"),
    ([["7", "8"]], "integer token ids, got '7'"),
    ("7,8", "list of token-id lists"),
    ([[[7, 8]]], r"integer token ids, got \[7, 8\]"),
    (np.array([[1.5, 2.0]]), "integer token ids"),
    (np.zeros((1, 2, 3), np.int32), "shape"),
    ([7, None], "list of token-id lists|integer token ids"),
    (None, "list of token-id lists"),
    (42, "list of token-id lists"),
])
def test_prompts_are_not_coerced(gen, prompts, message):
    with pytest.raises(InputError, match=message):
        gen.generate(prompts, max_new_tokens=2)


@pytest.mark.parametrize("stops, message", [
    ("12", "stop_token_ids must be a sequence"),
    ([1.0], "integer token ids, got 1.0"),
    ([True], "integer token ids, got True"),
    ([97], "outside the vocabulary"),
    ([-1], "outside the vocabulary"),
])
def test_stop_ids_are_not_coerced(gen, stops, message):
    with pytest.raises(InputError, match=message):
        gen.generate([[7, 8]], max_new_tokens=2, stop_token_ids=stops)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(seed=-1), "seed must be at least 0"),
    (dict(seed=MAX_SEED + 1), f"seed must be at most {MAX_SEED}"),
    (dict(seed=10**21), "seed must be at most"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(sampling={"temperature": 1.0}), "sampling must be a SamplingParams"),
    (dict(stream="yes"), "stream must be a callable"),
    (dict(sampling=SamplingParams(), temperature=0.5), "give either sampling= or temperature=, not both"),
    (dict(temperature="1"), "temperature must be a number"),
    (dict(top_k=-1), "top_k must be at least 0"),
    (dict(stream=print, stream_every=0), "stream_every must be at least 1"),
])
def test_generate_arguments(gen, kwargs, message):
    with pytest.raises(InputError, match=message):
        gen.generate([[7, 8]], **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature="1"), "temperature must be a number"),
    (dict(temperature=math.nan), "temperature must be finite"),
    (dict(temperature=math.inf), "temperature must be finite"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be > 0"),
    (dict(top_p=1.5), "top_p must be <= 1"),
    (dict(top_p=None), "top_p must be a number"),
    (dict(top_k=2.0), "top_k must be an integer"),
    (dict(top_k=-1), "top_k must be at least 0"),
    (dict(top_k=True), "top_k must be an integer"),
])
def test_sampling_params(kwargs, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(**kwargs)


def test_sampling_keywords_are_sampling_params(gen):
    """generate(temperature=, top_p=, top_k=) samples as generate(sampling=SamplingParams(...)) does."""
    [by_keywords] = gen.generate([[7, 8, 9]], max_new_tokens=6, temperature=0.9, top_p=0.8, top_k=20, seed=3)
    [by_params] = gen.generate([[7, 8, 9]], max_new_tokens=6, seed=3,
                               sampling=SamplingParams(temperature=0.9, top_p=0.8, top_k=20))
    [greedy] = gen.generate([[7, 8, 9]], max_new_tokens=6, temperature=0)
    assert by_keywords.token_ids == by_params.token_ids
    assert greedy.token_ids == gen.generate([[7, 8, 9]], max_new_tokens=6)[0].token_ids


def test_sampling_params_normalise_numbers():
    assert SamplingParams(temperature=1, top_p=np.float32(0.5), top_k=np.int64(3)) == \
        SamplingParams(temperature=1.0, top_p=0.5, top_k=3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache_dtype="int8"), "cache_dtype must be one of float32, bfloat16, float16, got 'int8'"),
    (dict(cache_dtype="float64"), "cache_dtype must be one of"),
    (dict(cache_dtype="nonsense"), "cache_dtype must be one of"),
    (dict(max_cache_len=1.5), "max_cache_len must be an integer"),
    (dict(max_cache_len=1), "max_cache_len must be at least 2"),
    (dict(max_cache_len=513), "max_cache_len must be at most 512"),  # the model's context
    (dict(num_steps=2), "need a draft head"),
])
def test_generator_arguments(target, kwargs, message):
    with pytest.raises(InputError, match=message):
        Generator(target, **kwargs)


@pytest.mark.parametrize("knobs, message", [
    (dict(num_steps="3"), "num_steps must be an integer"),
    (dict(num_steps=3.0), "num_steps must be an integer"),
    (dict(topk=True), "topk must be an integer"),
    (dict(num_steps=2, topk=2, num_draft_tokens=4.0), "num_draft_tokens must be a positive integer"),
])
def test_tree_knobs_are_not_coerced(target, knobs, message):
    with pytest.raises(InputError, match=message):
        Generator(target, random_head(target), **knobs)


def test_objects_of_the_wrong_kind(target):
    with pytest.raises(InputError, match="target must be a loaded Qwen3ForCausalLM"):
        Generator("Qwen/Qwen3-4B")
    with pytest.raises(InputError, match="draft must be a loaded Eagle3DraftHead"):
        Generator(target, target)


@pytest.mark.slow
def test_huge_max_new_tokens_costs_only_the_cache(target):
    """Result buffers are sized by what the cache holds, not by max_new_tokens."""
    _, settings, _, _ = plan_batch(target.config, [[7, 8], [7, 8, 9, 10]], max_new_tokens=10**9,
                                   sampling=SamplingParams(), stop_token_ids=(), max_cache_len=None,
                                   cache_dtype="float32")
    assert settings.capacity == 512 and settings.max_new_tokens == 511  # what a cache holds after a 1-token prompt
    [out] = Generator(target, max_cache_len=24).generate([[7, 8, 9]], max_new_tokens=10**9, stop_token_ids=())
    assert len(out.token_ids) == 21 and out.finish_reason == "length"


def test_memory_is_checked_before_allocating(target, monkeypatch):
    big = Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=5e6,
                      max_position_embeddings=2**24)
    with pytest.raises(InputError, match=r"needs at least .*GiB .*target KV cache .* but only .* is free"):
        check_generation_memory(big, batch=8, bucket=16, capacity=2**24, max_new_tokens=2**24, cache_dtype="bfloat16")
    import eagle3_jax.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda: (1000, "test memory"))
    with pytest.raises(InputError, match="only 0.0 MiB of test memory is free"):
        Generator(target).generate([[7, 8]], max_new_tokens=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=4),
                       st.lists(st.integers(-3, 200), max_size=3), st.integers(-2**70, 2**70),
                       st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)),
       field=st.sampled_from(["max_new_tokens", "seed", "stop_token_ids", "prompts", "stream_every"]))
@pytest.mark.slow
def test_any_argument_is_either_valid_or_an_input_error(gen, value, field):
    """Random values for each argument: an InputError or a normal result, never another exception."""
    kwargs = {"max_new_tokens": 2, "stop_token_ids": ()}
    prompts = [[7, 8]]
    if field == "prompts":
        prompts = value
    else:
        kwargs[field] = value
    if field == "max_new_tokens" and type(value) is int and value > 2:
        kwargs[field] = 2 if value < 10**6 else 10**9  # two shapes only (a huge value is capped by the cache)
    try:
        outs = gen.generate(prompts, **kwargs)
    except InputError:
        return
    assert all(isinstance(t, int) for o in outs for t in o.token_ids)


@pytest.mark.parametrize("arg", [5, None, b"/tmp/x", "", 3.5])
def test_model_paths_are_checked(arg):
    from eagle3_jax import CheckpointError, load_draft, load_target

    for fn in (load_target, load_draft):
        with pytest.raises(CheckpointError, match="a model must be named by"):
            fn(arg)


def test_dangling_and_looping_links_are_named(tmp_path):
    from eagle3_jax import CheckpointError, load_target

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    for name in ("loop", "dangling"):
        with pytest.raises(CheckpointError, match="symbolic link that leads nowhere"):
            load_target(tmp_path / name)
