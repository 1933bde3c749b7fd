"""Llama targets against HF transformers ``LlamaForCausalLM`` (float32, CPU): the config
(both transformers spellings of llama3 RoPE scaling), the RoPE frequencies, the forward,
greedy generation, export; plus the target registry's refusals."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import LLAMA3_SCALING, hf_greedy

from eagle3_jax import (
    ConfigError,
    Generator,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3ForCausalLM,
    load_target,
)
from eagle3_jax.config import RopeScaling
from eagle3_jax.hf_config import target_to_hf
from eagle3_jax.loading import save_target
from eagle3_jax.models.layers import rope_inv_freq
from eagle3_jax.models.registry import read_target_config, target_config_from_hf

REL_TOL = 1e-4


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf.model(torch.tensor(ids)).logits.numpy()


def test_llama_config_from_hf(hf_llama, hf_llama_tied):
    cfg = read_target_config(hf_llama.path)
    assert type(cfg) is LlamaConfig and cfg.model_type == "llama"
    assert cfg.qkv_bias and cfg.o_bias and not cfg.qk_norm and not cfg.tie_word_embeddings
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 32) and cfg.head_dim == 12
    tied = read_target_config(hf_llama_tied.path)
    assert tied.tie_word_embeddings and not tied.qkv_bias and tied.rope_scaling is None and tied.head_dim == 10
    hash(cfg)


def test_both_transformers_spellings_of_llama3_scaling_parse_alike(hf_llama):
    with open(os.path.join(hf_llama.path, "config.json")) as f:
        raw = json.load(f)
    v4 = {k: v for k, v in raw.items() if k != "rope_parameters"}
    v4.update(rope_theta=10000.0, rope_scaling=dict(LLAMA3_SCALING))
    v5 = {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**LLAMA3_SCALING, "rope_theta": 10000.0}
    assert target_config_from_hf(v4) == target_config_from_hf(v5) == read_target_config(hf_llama.path)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3' needs"),
    ({"rope_scaling": {**LLAMA3_SCALING, "low_freq_factor": 4.0}}, "low_freq_factor (4) must be less than"),
    ({"rope_scaling": {**LLAMA3_SCALING, "factor": "8"}}, "factor"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"model_type": "mistral"}, "unknown model_type 'mistral'; eagle3-jax supports qwen3, qwen2, llama"),
    ({"draft_vocab_size": 32}, "an EAGLE-3 draft head's config"),
])
def test_llama_config_errors(hf_llama, change, message):
    with open(os.path.join(hf_llama.path, "config.json")) as f:
        raw = {k: v for k, v in json.load(f).items() if k != "rope_parameters"} | {"rope_theta": 10000.0}
    with pytest.raises(ConfigError) as e:
        target_config_from_hf({**raw, **change}, where="cfg.json")
    assert message in str(e.value) and str(e.value).startswith("cfg.json")


def test_llama3_inverse_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_theta=500000.0,
                                      max_position_embeddings=131072,
                                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_inv_freq(16, 500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)
    # the three bands are all present: kept, interpolated and divided by the factor
    plain = np.asarray(rope_inv_freq(16, 500000.0))
    ratio = plain / np.asarray(ours)
    assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 8.0).any()
    assert ((ratio > 1.01) & (ratio < 7.99)).any()


@pytest.mark.slow
def test_llama_forward_matches_hf_and_scaling_matters(hf_llama):
    model = load_target(hf_llama.path, dtype="float32", progress=False)
    assert isinstance(model, LlamaForCausalLM)
    ids = np.random.default_rng(3).integers(0, 97, size=(2, 60))
    ref = hf_logits(hf_llama, ids)
    ours = np.asarray(model.forward_sequence(jnp.asarray(ids, jnp.int32)).logits)
    assert rel_err(ours, ref) < REL_TOL
    # the same weights without the scaling are measurably wrong: the test can tell
    import dataclasses

    from flax import nnx

    graphdef, state = nnx.split(model)
    unscaled = LlamaForCausalLM(dataclasses.replace(model.config, rope_scaling=None), rngs=nnx.Rngs(0))
    nnx.update(unscaled, state)
    wrong = np.asarray(unscaled.forward_sequence(jnp.asarray(ids, jnp.int32)).logits)
    assert rel_err(wrong, ref) > 100 * REL_TOL


@pytest.mark.parametrize("name", ["hf_llama", "hf_llama_tied"])
def test_llama_greedy_generation_matches_hf(request, name):
    hf = request.getfixturevalue(name)
    model = load_target(hf.path, dtype="float32", progress=False)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(6, 97, size=n).tolist() for n in (30, 9)]  # past original_max_position_embeddings
    outs = Generator(model).generate(prompts, max_new_tokens=12, stop_token_ids=())
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf.model, prompt, 12)


@pytest.mark.slow
def test_llama_export_loads_in_transformers(hf_llama, tmp_path):
    model = load_target(hf_llama.path, dtype="float32", progress=False)
    save_target(model, tmp_path / "out", dtype="float32")
    assert target_config_from_hf(target_to_hf(model.config), among=LlamaConfig.MODEL_TYPES) == model.config
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = np.random.default_rng(4).integers(0, 97, size=(1, 40))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert rel_err(ref, hf_logits(hf_llama, ids)) < REL_TOL
    reloaded = load_target(tmp_path / "out", dtype="float32", progress=False)
    assert reloaded.config == model.config


def test_a_qwen3_module_is_not_a_llama_and_the_registry_builds_each():
    from eagle3_jax.models.registry import TARGETS, build_target

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, rope_theta=1e4)
    assert isinstance(build_target(cfg), LlamaForCausalLM)
    assert not isinstance(build_target(cfg), Qwen3ForCausalLM)
    assert set(TARGETS) == {"qwen3", "qwen2", "llama"}
    with pytest.raises(ConfigError, match="model_type"):
        LlamaConfig(**{**cfg.__dict__, "model_type": "qwen3"})


@pytest.mark.slow
def test_llama_converts_to_orbax_and_back(hf_llama, tmp_path):
    from eagle3_jax import convert_target

    out = convert_target(hf_llama.path, tmp_path / "conv", dtype="float32", progress=False)
    model = load_target(out, dtype="float32", progress=False)
    assert isinstance(model, LlamaForCausalLM) and model.config == read_target_config(hf_llama.path)
    ids = np.random.default_rng(8).integers(0, 97, size=(1, 40))
    ours = np.asarray(model.forward_sequence(jnp.asarray(ids, jnp.int32)).logits)
    assert rel_err(ours, hf_logits(hf_llama, ids)) < REL_TOL


def test_llama2_config_without_rope_theta_takes_transformers_default(hf_llama_tied):
    with open(os.path.join(hf_llama_tied.path, "config.json")) as f:
        raw = {k: v for k, v in json.load(f).items() if k not in ("rope_theta", "rope_parameters", "rope_scaling")}
    cfg = target_config_from_hf(raw)
    assert cfg.rope_theta == 10000.0 == transformers.LlamaConfig().rope_parameters["rope_theta"]


def test_llama_config_refuses_flags_it_can_not_write():
    base = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, rope_theta=1e4)
    with pytest.raises(ConfigError, match="qk_norm must be false for a llama target"):
        LlamaConfig(**base, qk_norm=True)
    with pytest.raises(ConfigError, match="must agree for a llama target"):
        LlamaConfig(**base, qkv_bias=True, o_bias=False)
    from eagle3_jax import Qwen3Config

    with pytest.raises(ConfigError, match="read_target_config / target_config_from_hf read every supported type"):
        target_config_from_hf(target_to_hf(LlamaConfig(**base)), among=Qwen3Config.MODEL_TYPES)
