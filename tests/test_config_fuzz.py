"""Property tests of the config parsers on mutated config.json files.

Starting from realistic Qwen3 (transformers 4 and 5 spellings), Qwen2 and
EAGLE-3 head configs, random keys get random JSON values (null, bools, huge
ints, NaN, strings, lists, nested objects) or are deleted, or the whole file is
replaced by random bytes. ``read_target_config`` / ``read_eagle3_config`` must then either return a config
whose every field has the right type and range, or raise ConfigError naming the
file and a key that was changed; any other exception is a bug.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eagle3_jax.config import (
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_HIDDEN_SIZE,
    MAX_INTERMEDIATE_SIZE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_ROPE_THETA,
    MAX_TOKEN_ID,
    MAX_VOCAB_SIZE,
    MIN_ROPE_THETA,
    SUPPORTED_MODEL_TYPES,
    Eagle3Config,
    Qwen3Config,
)
from eagle3_jax.errors import ConfigError
from eagle3_jax.hf_config import target_to_hf
from eagle3_jax.hf_heads import eagle3_to_hf, parse_eagle3, read_eagle3_config
from eagle3_jax.models.registry import read_target_config, target_config_from_hf

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# transformers 5 Qwen3Config.save_pretrained (rope_parameters, layer_types), sizes of tests/conftest.py TINY.
QWEN3_V5 = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 5, "head_dim": 12, "hidden_act": "silu", "hidden_size": 40, "initializer_range": 0.2,
    "intermediate_size": 56, "layer_types": ["full_attention"] * 4, "max_position_embeddings": 512,
    "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 4, "num_hidden_layers": 4,
    "num_key_value_heads": 2, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "sliding_window": None,
    "tie_word_embeddings": False, "transformers_version": "5.0.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 97,
}
# transformers 4 spelling (top-level rope_theta / rope_scaling), as Qwen3-4B-Thinking-2507 ships it.
QWEN3_V4 = {**target_to_hf(Qwen3Config.qwen3_4b_thinking_2507()), "rope_scaling": None, "torch_dtype": "bfloat16"}
# Qwen2: no head_dim (derived as hidden / heads), no attention_bias.
QWEN2 = {k: v for k, v in QWEN3_V5.items() if k not in ("head_dim", "attention_bias")} | {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
# An EAGLE-3 head (SpecForge LlamaForCausalLMEagle3) as tests/eagle3_reference.py writes it, with eagle_config.
HEAD = eagle3_to_hf(Eagle3Config(hidden_size=40, intermediate_size=56, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=12, vocab_size=97, draft_vocab_size=31, target_hidden_size=40,
                                 rope_theta=10000.0, max_position_embeddings=1024, aux_layer_ids=(0, 2, 3),
                                 bos_token_id=1, eos_token_id=5))
GENERATION = {"bos_token_id": 1, "eos_token_id": [5, 9], "do_sample": True, "temperature": 0.6}

# Keys a parser reads, plus some it must ignore, so that mutations also add keys the base lacks.
EXTRA_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "eagle_config", "layer_types", "head_dim",
              "num_key_value_heads", "draft_vocab_size", "target_hidden_size", "fc_norm", "bias", "mlp_bias",
              "attention_bias", "use_sliding_window", "tie_word_embeddings", "pad_token_id", "foo", "")
SUB_KEYS = ("rope_theta", "rope_type", "type", "factor", "eagle_aux_hidden_state_layer_ids", "x")

ints = (st.integers(min_value=-3, max_value=200)
        | st.sampled_from([0, 1, 2, 3, 97, 1023, 1024, 1025, 2**17, 2**17 + 1, 2**24, 2**24 + 1, 2**31, 2**63, 10**30,
                           -2**63, 10**400])
        | st.integers())
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, 1.0, 256.0, 1e-6, 1e4, 1e30, 1e400, -1e4, math.nan, math.inf, -math.inf, 5e-324])
strings = st.sampled_from(["", "256", "abc", "no", "true", "null", "silu", "gelu", "qwen3", "qwen2", "llama",
                           "default", "yarn", "linear", "full_attention", "sliding_attention",
                           "LlamaForCausalLMEagle3"]) | st.text(max_size=6)
scalars = st.none() | st.booleans() | ints | floats | strings
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(SUB_KEYS) | st.text(max_size=4), children, max_size=4),
    max_leaves=12,
)


def deep_nesting(depth: int) -> object:
    value: object = 1
    for i in range(depth):
        value = [value] if i % 2 else {"rope_theta": value}
    return value



def read_qwen3(model_dir):
    """A target's config read as ``Qwen3Config``'s types (qwen3, qwen2) only."""
    return read_target_config(model_dir, among=Qwen3Config.MODEL_TYPES)

@st.composite
def mutated(draw, base: dict) -> tuple[dict, list[str]]:
    """``base`` with 1-3 keys replaced by random JSON, deleted, or changed one level down."""
    raw = copy.deepcopy(base)
    keys = draw(st.lists(st.sampled_from(sorted(set(base) | set(EXTRA_KEYS))), min_size=1, max_size=3, unique=True))
    for key in keys:
        action = draw(st.sampled_from(["replace", "replace", "delete", "nested", "deep"]))
        if action == "delete":
            raw.pop(key, None)
        elif action == "nested" and isinstance(raw.get(key), dict):
            raw[key][draw(st.sampled_from(sorted(raw[key]) + list(SUB_KEYS)))] = draw(json_values)
        elif action == "nested" and isinstance(raw.get(key), list) and raw[key]:
            raw[key][draw(st.integers(0, len(raw[key]) - 1))] = draw(json_values)
        elif action == "deep":
            raw[key] = deep_nesting(draw(st.sampled_from([5, 50, 400])))
        else:
            raw[key] = draw(json_values)
    return raw, keys


# ---------------------------------------------------------------- checks


def assert_int(value, name, lo, hi):
    assert type(value) is int and lo <= value <= hi, (name, value)


def assert_common(cfg):
    for name, hi in (("hidden_size", MAX_HIDDEN_SIZE), ("intermediate_size", MAX_INTERMEDIATE_SIZE),
                     ("num_attention_heads", MAX_HEADS), ("num_key_value_heads", MAX_HEADS),
                     ("head_dim", MAX_HEAD_DIM), ("vocab_size", MAX_VOCAB_SIZE),
                     ("max_position_embeddings", MAX_POSITIONS)):
        assert_int(getattr(cfg, name), name, 1, hi)
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.head_dim % 2 == 0
    assert type(cfg.rope_theta) is float and MIN_ROPE_THETA < cfg.rope_theta <= MAX_ROPE_THETA
    assert type(cfg.rms_norm_eps) is float and 0 < cfg.rms_norm_eps < 1
    hash(cfg)  # a static jit argument


def assert_valid_target(cfg: Qwen3Config, round_trip: bool = True):
    assert isinstance(cfg, Qwen3Config)
    assert_common(cfg)
    assert_int(cfg.num_hidden_layers, "num_hidden_layers", 1, MAX_LAYERS)
    assert cfg.model_type in SUPPORTED_MODEL_TYPES
    for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm"):
        assert type(getattr(cfg, name)) is bool, name
    assert type(cfg.eos_token_ids) is tuple
    for t in cfg.eos_token_ids:
        assert_int(t, "eos_token_ids", 0, MAX_TOKEN_ID)
    for name in ("bos_token_id", "pad_token_id"):
        if getattr(cfg, name) is not None:
            assert_int(getattr(cfg, name), name, 0, MAX_TOKEN_ID)
    if round_trip:  # (qkv_bias without o_bias, set from Python, has no qwen3 config.json spelling)
        assert target_config_from_hf(target_to_hf(cfg), among=Qwen3Config.MODEL_TYPES) == cfg


def assert_valid_head(cfg: Eagle3Config):
    assert isinstance(cfg, Eagle3Config)
    assert_common(cfg)
    assert_int(cfg.draft_vocab_size, "draft_vocab_size", 1, cfg.vocab_size)
    assert_int(cfg.target_hidden_size, "target_hidden_size", 1, MAX_HIDDEN_SIZE)
    if cfg.aux_layer_ids is not None:
        assert type(cfg.aux_layer_ids) is tuple
        for i in cfg.aux_layer_ids:
            assert_int(i, "aux_layer_ids", -1, MAX_LAYERS - 2)
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(cfg, name) is not None:
            assert_int(getattr(cfg, name), name, 0, MAX_TOKEN_ID)
    assert parse_eagle3(eagle3_to_hf(cfg)) == cfg


def load_or_error(load, directory):
    """``load(directory)``, or the ConfigError it raised; any other exception fails the test."""
    try:
        return load(directory), None
    except ConfigError as e:
        return None, str(e)


def write(directory, name, content):
    path = os.path.join(directory, name)
    with open(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content if isinstance(content, bytes) else json.dumps(content))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fuzz"))


# ------------------------------------------------------------------ tests


def test_bases_parse(workdir):
    for base in (QWEN3_V5, QWEN3_V4, QWEN2):
        write(workdir, "config.json", base)
        assert_valid_target(read_target_config(workdir, among=Qwen3Config.MODEL_TYPES))
    write(workdir, "config.json", HEAD)
    assert_valid_head(read_eagle3_config(workdir))


@FUZZ
@given(data=st.data(), base=st.sampled_from([QWEN3_V5, QWEN3_V4, QWEN2]))
def test_mutated_target_config(workdir, data, base):
    raw, keys = data.draw(mutated(base))
    path = write(workdir, "config.json", raw)
    cfg, error = load_or_error(read_qwen3, workdir)
    if error is None:
        assert_valid_target(cfg)
    else:
        assert error.startswith(path + ": "), error
        assert any(k in error for k in keys if k), (keys, error)


@FUZZ
@given(data=st.data())
def test_mutated_head_config(workdir, data):
    raw, keys = data.draw(mutated(HEAD))
    path = write(workdir, "config.json", raw)
    cfg, error = load_or_error(read_eagle3_config, workdir)
    if error is None:
        assert_valid_head(cfg)
    else:
        assert error.startswith(path + ": "), error
        assert any(k in error for k in keys if k), (keys, error)


@FUZZ
@given(data=st.data())
def test_mutated_generation_config(workdir, data):
    write(workdir, "config.json", QWEN3_V5)
    if data.draw(st.booleans()):
        raw, keys = data.draw(mutated(GENERATION))
    else:
        raw, keys = data.draw(json_values), None  # not even an object
    path = write(workdir, "generation_config.json", raw)
    try:
        cfg, error = load_or_error(read_qwen3, workdir)
    finally:
        os.remove(path)
    if error is None:
        assert_valid_target(cfg)
        assert cfg.eos_token_ids[0] == 5
    else:
        assert error.startswith(path + ": "), error
        if keys is not None:
            assert "eos_token_id" in error, error


@FUZZ
@given(content=st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode())
       | st.sampled_from([b"", b"  \n", b"\xef\xbb\xbf", b"\xff\xfe{}", b"[" * 100_000, b"1" * 5000, b"{\"a\": 1",
                          b"NaN", b"{\"model_type\": \"qwen3\"}", b"\xef\xbb\xbf{}"]),
       head=st.booleans())
def test_random_file_contents(workdir, content, head):
    path = write(workdir, "config.json", content)
    cfg, error = load_or_error(read_eagle3_config if head else read_qwen3, workdir)
    assert cfg is None, "random bytes made a valid config"
    assert error.startswith(path + ": "), error


@FUZZ
@given(rope_theta=scalars, feature_layers=st.none() | json_values | st.lists(ints, max_size=4))
def test_with_overrides(rope_theta, feature_layers):
    cfg = parse_eagle3(HEAD)
    try:
        out = cfg.with_overrides(rope_theta=rope_theta, feature_layers=feature_layers)
    except ConfigError as e:
        assert ("rope_theta" in str(e)) or ("feature_layers" in str(e)), str(e)
        return
    assert_valid_head(out)
    if feature_layers is not None:
        assert out.feature_layers(Qwen3Config.qwen3_4b_thinking_2507()) == tuple(feature_layers)


@FUZZ
@given(field=st.sampled_from(["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps",
                              "max_position_embeddings", "tie_word_embeddings", "qkv_bias", "model_type",
                              "eos_token_ids", "bos_token_id", "pad_token_id"]),
       value=json_values)
def test_constructor_checks_fields(field, value):
    """Built from Python, a config is held to the same rules, with the field named."""
    base = Qwen3Config.qwen3_4b_thinking_2507()
    try:
        cfg = dataclasses.replace(base, **{field: value})
    except ConfigError as e:
        assert field in str(e), str(e)
        return
    assert_valid_target(cfg, round_trip=False)
