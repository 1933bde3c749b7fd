import json

import pytest
import transformers

from eagle3_jax import ConfigError, Qwen3Config

BASE = dict(model_type="qwen3", vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6)


def test_rope_theta_both_spellings():
    a = Qwen3Config.from_hf_dict(BASE)
    raw = {k: v for k, v in BASE.items() if k != "rope_theta"}
    b = Qwen3Config.from_hf_dict({**raw, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert a == b and a.rope_theta == 1e6


def test_transformers5_config_json_parses(tmp_path):
    cfg = transformers.Qwen3Config(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=3, num_key_value_heads=1, head_dim=10, rope_theta=12345.0,
                                   eos_token_id=[7, 8])
    cfg.save_pretrained(tmp_path)
    ours = Qwen3Config.from_pretrained(tmp_path)
    assert ours.rope_theta == 12345.0
    assert ours.head_dim == 10  # read, not derived (24 / 3 = 8)
    assert ours.eos_token_ids == (7, 8)
    assert ours.qk_norm and not ours.qkv_bias


def test_generation_config_adds_eos(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "eos_token_id": 5}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9]}))
    assert Qwen3Config.from_pretrained(tmp_path).eos_token_ids == (5, 9)


def test_qwen2_flags():
    raw = {**BASE, "model_type": "qwen2"}
    raw.pop("head_dim")
    cfg = Qwen3Config.from_hf_dict(raw)
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.qk_norm
    assert cfg.head_dim == 8  # qwen2 derives hidden / heads


def test_no_eos_means_no_stop_ids():
    assert Qwen3Config.from_hf_dict(BASE).eos_token_ids == ()


def test_named_constructor_qwen3_4b_thinking():
    cfg = Qwen3Config.qwen3_4b_thinking_2507()
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (36, 2560, 32, 8)
    assert cfg.head_dim == 128 and cfg.intermediate_size == 9728 and cfg.vocab_size == 151936
    assert cfg.rope_theta == 5_000_000 and cfg.tie_word_embeddings and not cfg.qkv_bias
    assert cfg.eos_token_ids == (151645, 151643)
    assert cfg.default_feature_layers == (2, 18, 33)
    hash(cfg)  # usable as a static jit argument


def test_round_trip_through_hf_dict():
    cfg = Qwen3Config.qwen3_4b_thinking_2507()
    assert Qwen3Config.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "unknown model_type 'llama'"),
    ({"model_type": None}, "unknown model_type None"),
    ({"hidden_size": None}, "missing required key(s): hidden_size"),
    ({"rope_theta": None}, "missing rope_theta"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn', which is not implemented"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2}}, "rope type 'linear'"),
    ({"use_sliding_window": True}, "sliding"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"vocab_size": -3}, "vocab_size must be a positive integer"),
    ({"eos_token_id": "x"}, "eos_token_id must be an int"),
])
def test_config_errors(change, message):
    raw = {**BASE, **change}
    raw = {k: v for k, v in raw.items() if v is not None or k == "model_type"}
    with pytest.raises(ConfigError) as e:
        Qwen3Config.from_hf_dict(raw, where="cfg.json")
    assert message in str(e.value)
    assert str(e.value).startswith("cfg.json")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        Qwen3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen3Config.from_pretrained(tmp_path)
