import json
import re

import pytest
import transformers

from eagle3_jax import ConfigError, Qwen3Config
from eagle3_jax.hf_config import target_to_hf
from eagle3_jax.hf_heads import parse_eagle3, read_eagle3_config
from eagle3_jax.hf_json import read_json
from eagle3_jax.models.registry import read_target_config, target_config_from_hf

QWEN = Qwen3Config.MODEL_TYPES  # the model types Qwen3Config reads

BASE = dict(model_type="qwen3", vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6)


def test_rope_theta_both_spellings():
    a = target_config_from_hf(BASE, among=QWEN)
    raw = {k: v for k, v in BASE.items() if k != "rope_theta"}
    b = target_config_from_hf({**raw, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, among=QWEN)
    assert a == b and a.rope_theta == 1e6


def test_transformers5_config_json_parses(tmp_path):
    cfg = transformers.Qwen3Config(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=3, num_key_value_heads=1, head_dim=10, rope_theta=12345.0,
                                   eos_token_id=[7, 8])
    cfg.save_pretrained(tmp_path)
    ours = read_target_config(tmp_path, among=QWEN)
    assert ours.rope_theta == 12345.0
    assert ours.head_dim == 10  # read, not derived (24 / 3 = 8)
    assert ours.eos_token_ids == (7, 8)
    assert ours.qk_norm and not ours.qkv_bias


def test_generation_config_adds_eos(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "eos_token_id": 5}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9]}))
    assert read_target_config(tmp_path, among=QWEN).eos_token_ids == (5, 9)


def test_an_eos_outside_the_vocabulary_names_its_file(tmp_path):
    vocab = BASE["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "eos_token_id": 5}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, vocab]}))
    with pytest.raises(ConfigError, match=f"generation_config.json: eos_token_id {vocab} is outside the vocabulary"):
        read_target_config(tmp_path, among=QWEN)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "eos_token_id": vocab}))
    with pytest.raises(ConfigError, match=f"config.json: eos_token_id {vocab} is outside the vocabulary"):
        read_target_config(tmp_path, among=QWEN)


def test_qwen2_flags():
    raw = {**BASE, "model_type": "qwen2"}
    raw.pop("head_dim")
    cfg = target_config_from_hf(raw, among=QWEN)
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.qk_norm
    assert cfg.head_dim == 8  # qwen2 derives hidden / heads


def test_no_eos_means_no_stop_ids():
    assert target_config_from_hf(BASE, among=QWEN).eos_token_ids == ()


def test_named_constructor_qwen3_4b_thinking():
    cfg = Qwen3Config.qwen3_4b_thinking_2507()
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert shape == (36, 2560, 32, 8)
    assert cfg.head_dim == 128 and cfg.intermediate_size == 9728 and cfg.vocab_size == 151936
    assert cfg.rope_theta == 5_000_000 and cfg.tie_word_embeddings and not cfg.qkv_bias
    assert cfg.eos_token_ids == (151645, 151643)
    assert cfg.default_feature_layers == (2, 18, 33)
    hash(cfg)  # usable as a static jit argument


def test_round_trip_through_hf_dict():
    cfg = Qwen3Config.qwen3_4b_thinking_2507()
    assert target_config_from_hf(target_to_hf(cfg), among=QWEN) == cfg


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
        target_config_from_hf(raw, where="cfg.json", among=QWEN)
    assert message in str(e.value)
    assert str(e.value).startswith("cfg.json")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        read_target_config(tmp_path, among=QWEN)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_target_config(tmp_path, among=QWEN)


# ------------------------------------------------- hardening: every bad value is a ConfigError naming file and key

QWEN2_BASE = {k: v for k, v in BASE.items() if k != "head_dim"} | {"model_type": "qwen2"}
HEAD_BASE = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
             "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "vocab_size": 100, "draft_vocab_size": 40, "target_hidden_size": 32, "rope_theta": 1e4,
             "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]}}

NAN, INF = float("nan"), float("inf")


def _write(tmp_path, raw, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(raw))  # NaN / Infinity are written as the literals Python's json accepts
    return str(path)


@pytest.mark.parametrize("change, key", [
    ({"rope_theta": "abc"}, "rope_theta"),
    ({"rope_theta": NAN}, "rope_theta"),
    ({"rope_theta": INF}, "rope_theta"),
    ({"rope_theta": -1e6}, "rope_theta"),
    ({"rope_theta": 0}, "rope_theta"),
    ({"rope_theta": True}, "rope_theta"),
    ({"rope_theta": 10**400}, "rope_theta"),
    ({"rope_theta": [1e6]}, "rope_theta"),
    ({"rope_theta": None, "rope_parameters": {"rope_theta": NAN}}, "rope_parameters.rope_theta"),
    ({"rope_parameters": "default"}, "rope_parameters"),
    ({"rope_scaling": "linear"}, "rope_scaling"),
    ({"rope_scaling": [1]}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": ["default"]}}, "rope_scaling"),
    ({"hidden_size": "256"}, "hidden_size"),
    ({"hidden_size": 256.0}, "hidden_size"),
    ({"hidden_size": 2**17 + 1}, "hidden_size"),
    ({"intermediate_size": 10**30}, "intermediate_size"),
    ({"vocab_size": 2**24 + 1}, "vocab_size"),
    ({"vocab_size": True}, "vocab_size"),
    ({"num_hidden_layers": -2}, "num_hidden_layers"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"num_hidden_layers": 1000000}, "num_hidden_layers"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_attention_heads": 4.0}, "num_attention_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"num_key_value_heads": "2"}, "num_key_value_heads"),
    ({"head_dim": 0}, "head_dim"),
    ({"head_dim": 2048}, "head_dim"),
    ({"head_dim": 15}, "head_dim must be even"),
    ({"head_dim": [16]}, "head_dim"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"rms_norm_eps": 1.5}, "rms_norm_eps"),
    ({"rms_norm_eps": NAN}, "rms_norm_eps"),
    ({"max_position_embeddings": 1e30}, "max_position_embeddings"),
    ({"max_position_embeddings": 2**24 + 1}, "max_position_embeddings"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
    ({"tie_word_embeddings": 1}, "tie_word_embeddings"),
    ({"attention_bias": "false"}, "attention_bias"),
    ({"use_sliding_window": "false"}, "use_sliding_window"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id"),
    ({"eos_token_id": [1, True]}, "eos_token_id"),
    ({"eos_token_id": -1}, "eos_token_id"),
    ({"eos_token_id": 2**40}, "eos_token_id"),
    ({"eos_token_id": {"id": 1}}, "eos_token_id"),
    ({"bos_token_id": "x"}, "bos_token_id"),
    ({"bos_token_id": [1]}, "bos_token_id"),
    ({"pad_token_id": 1.0}, "pad_token_id"),
    ({"layer_types": 5}, "layer_types"),
    ({"layer_types": "full_attention"}, "layer_types"),
    ({"layer_types": [["full_attention"], {}]}, "layer_types"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types=['full_attention', 'sliding_attention']"),
    ({"hidden_act": ["silu"]}, "hidden_act"),
    ({"model_type": ["qwen3"]}, "model_type"),
    ({"model_type": {"qwen3": 1}}, "model_type"),
])
def test_bad_target_values_name_file_and_key(tmp_path, change, key):
    path = _write(tmp_path, {**BASE, **change})
    with pytest.raises(ConfigError) as e:
        read_target_config(tmp_path, among=QWEN)
    assert str(e.value).startswith(path + ": ") and key in str(e.value), str(e.value)


@pytest.mark.parametrize("change, key", [
    ({"hidden_size": 2}, "hidden_size (2) // num_attention_heads (4) = 0"),  # no head_dim to fall back on
    ({"hidden_size": 44}, "= 11 is not a usable head_dim"),  # odd
    ({"hidden_size": 2**17, "num_attention_heads": 1, "num_key_value_heads": 1}, "= 131072 is not a usable head_dim"),
])
def test_derived_head_dim_is_checked(change, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        target_config_from_hf({**QWEN2_BASE, **change}, where="cfg.json", among=QWEN)


@pytest.mark.parametrize("change, key", [
    ({"eagle_config": [1]}, "eagle_config"),
    ({"eagle_config": "x"}, "eagle_config"),
    ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, "1", 2]}},
     "eagle_config.eagle_aux_hidden_state_layer_ids"),
    ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1.0, 2]}},
     "eagle_config.eagle_aux_hidden_state_layer_ids"),
    ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [-2, 1, 2]}},
     "eagle_config.eagle_aux_hidden_state_layer_ids"),
    ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": {"a": 1}}},
     "eagle_config.eagle_aux_hidden_state_layer_ids"),
    ({"architectures": "LlamaForCausalLMEagle3"}, "architectures"),
    ({"architectures": 5}, "architectures"),
    ({"architectures": [["LlamaForCausalLMEagle3"]]}, "architectures"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"num_hidden_layers": 1.0}, "num_hidden_layers"),
    ({"num_hidden_layers": 2}, "num_hidden_layers=2"),
    ({"hidden_size": "32"}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"head_dim": 0}, "head_dim"),
    ({"draft_vocab_size": 0}, "draft_vocab_size"),
    ({"draft_vocab_size": 101}, "draft_vocab_size (101) exceeds vocab_size (100)"),
    ({"target_hidden_size": 0}, "target_hidden_size"),
    ({"target_hidden_size": 1e3}, "target_hidden_size"),
    ({"rope_theta": NAN}, "rope_theta"),
    ({"rope_theta": "1e4"}, "rope_theta"),
    ({"rope_scaling": "linear"}, "rope_scaling"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"max_position_embeddings": 1e30}, "max_position_embeddings"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
    ({"fc_norm": "false"}, "fc_norm"),
    ({"bias": 0}, "bias"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id"),
    ({"bos_token_id": "x"}, "bos_token_id"),
])
def test_bad_head_values_name_file_and_key(tmp_path, change, key):

    path = _write(tmp_path, {**HEAD_BASE, **change})
    with pytest.raises(ConfigError) as e:
        read_eagle3_config(tmp_path)
    assert str(e.value).startswith(path + ": ") and key in str(e.value), str(e.value)


def test_head_base_and_null_means_absent():

    cfg = parse_eagle3(HEAD_BASE)
    assert cfg.aux_layer_ids == (0, 1, 2) and cfg.draft_vocab_size == 40
    nulls = {"num_key_value_heads": None, "head_dim": None, "draft_vocab_size": None, "target_hidden_size": None,
             "num_hidden_layers": None, "eagle_config": None, "rope_scaling": None, "eos_token_id": None,
             "rms_norm_eps": None, "fc_norm": None, "tie_word_embeddings": None}
    cfg = parse_eagle3({**HEAD_BASE, **nulls})
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.draft_vocab_size, cfg.target_hidden_size) == (4, 8, 100, 32)
    assert cfg.aux_layer_ids is None and cfg.eos_token_id is None and cfg.rms_norm_eps == 1e-6


def test_target_null_means_absent_and_unknown_keys_are_ignored():
    nulls = {"num_key_value_heads": None, "head_dim": None, "rms_norm_eps": None, "max_position_embeddings": None,
             "tie_word_embeddings": None, "attention_bias": None, "use_sliding_window": None, "layer_types": None,
             "rope_scaling": None, "rope_parameters": None, "eos_token_id": None, "bos_token_id": None,
             "pad_token_id": None, "hidden_act": None}
    junk = {"sliding_window": "x", "initializer_range": NAN, "foo": [[[{}]]], "quantization_config": {"bits": "4"}}
    cfg = target_config_from_hf({**BASE, **nulls, **junk}, among=QWEN)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.max_position_embeddings) == (4, 8, 1e-6, 32768)
    assert cfg.eos_token_ids == () and cfg.bos_token_id is None and not cfg.tie_word_embeddings
    assert target_config_from_hf({**BASE, "layer_types": ["full_attention"] * 2, "eos_token_id": []}, among=QWEN) \
        == target_config_from_hf(BASE, among=QWEN)


@pytest.mark.parametrize("content, message", [
    (b"", "not valid JSON (the file is empty)"),
    (b" \n\t", "not valid JSON (the file is empty)"),
    (b"\xff\xfe\x00{", "not valid JSON (not UTF-8 text"),
    (b'{"model_type": "qwen3", "x": "\xe9"}', "not valid JSON (not UTF-8 text"),
    (b"[1, 2]", "expected a JSON object, got [1, 2] (a list)"),
    (b'"qwen3"', "expected a JSON object, got 'qwen3' (a string)"),
    (b"null", "expected a JSON object, got null"),
    (b"NaN", "expected a JSON object, got nan"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON (nested too deeply)"),
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "not valid JSON (nested too deeply)"),
    (b'{"vocab_size": ' + b"9" * 5000 + b"}", "not valid JSON (a number with too many digits)"),
    (b'{"model_type": "qwen3",', "not valid JSON"),
])
def test_broken_json_files(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    path = str(tmp_path / "config.json")
    with pytest.raises(ConfigError) as e:
        read_target_config(tmp_path, among=QWEN)
    assert str(e.value).startswith(path + ": ") and message in str(e.value), str(e.value)


def test_unreadable_paths(tmp_path):

    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match="config.json: not a regular file"):
        read_target_config(tmp_path, among=QWEN)
    (tmp_path / "file").write_text("{}")
    with pytest.raises(ConfigError, match="file/config.json: can not be read"):
        read_eagle3_config(tmp_path / "file")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(BASE).encode())
    assert read_json(tmp_path / "bom.json") == BASE  # a byte-order mark is tolerated


@pytest.mark.parametrize("generation, key", [
    ("{broken", "not valid JSON"),
    ("", "the file is empty"),
    ("[5]", "expected a JSON object"),
    (json.dumps({"eos_token_id": "5"}), "eos_token_id"),
    (json.dumps({"eos_token_id": [5, None]}), "eos_token_id"),
    (json.dumps({"eos_token_id": 5.0}), "eos_token_id"),
])
def test_broken_generation_config(tmp_path, generation, key):
    _write(tmp_path, {**BASE, "eos_token_id": 5})
    (tmp_path / "generation_config.json").write_text(generation)
    with pytest.raises(ConfigError) as e:
        read_target_config(tmp_path, among=QWEN)
    assert str(e.value).startswith(str(tmp_path / "generation_config.json") + ": ") and key in str(e.value)


def test_target_config_from_hf_refuses_non_objects():
    with pytest.raises(ConfigError, match="cfg.json: expected a JSON object"):
        target_config_from_hf([1], where="cfg.json", among=QWEN)
    with pytest.raises(ConfigError, match="gen.json: expected a JSON object"):
        target_config_from_hf(BASE, where="cfg.json", generation_config=[5], generation_where="gen.json", among=QWEN)


def test_limits_admit_the_largest_published_checkpoints():
    # Qwen3-235B-A22B (dense-equivalent attention shape) and Llama-3.1-405B, spelled as a qwen3 config.
    qwen = target_config_from_hf({**BASE, "num_hidden_layers": 94, "num_attention_heads": 64,
                                     "num_key_value_heads": 4, "hidden_size": 4096, "head_dim": 128,
                                     "intermediate_size": 12288, "vocab_size": 151936,
                                     "max_position_embeddings": 262144, "rope_theta": 5000000}, among=QWEN)
    assert qwen.num_hidden_layers == 94 and qwen.rope_theta == 5e6 and isinstance(qwen.rope_theta, float)
    llama = target_config_from_hf({**BASE, "num_hidden_layers": 126, "num_attention_heads": 128,
                                      "num_key_value_heads": 8, "hidden_size": 16384, "head_dim": 128,
                                      "intermediate_size": 53248, "vocab_size": 128256,
                                      "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5},
                                  among=QWEN)
    assert llama.hidden_size == 16384 and llama.intermediate_size == 53248
    edge = target_config_from_hf({**BASE, "num_hidden_layers": 1024, "vocab_size": 2**24, "head_dim": 1024,
                                     "max_position_embeddings": 2**24, "hidden_size": 2**17,
                                     "intermediate_size": 2**17, "num_attention_heads": 1024,
                                     "num_key_value_heads": 1024}, among=QWEN)
    assert edge.num_hidden_layers == 1024


@pytest.mark.parametrize("change, field", [
    ({"vocab_size": True}, "vocab_size"),
    ({"hidden_size": 32.0}, "hidden_size"),
    ({"num_hidden_layers": 2000}, "num_hidden_layers"),
    ({"head_dim": 0}, "head_dim"),
    ({"rope_theta": NAN}, "rope_theta"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"rope_theta": "1e6"}, "rope_theta"),
    ({"rms_norm_eps": None}, "rms_norm_eps"),
    ({"rms_norm_eps": INF}, "rms_norm_eps"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
    ({"qk_norm": 1}, "qk_norm"),
    ({"eos_token_ids": 5}, "eos_token_ids"),
    ({"eos_token_ids": (5, "6")}, "eos_token_ids"),
    ({"bos_token_id": -1}, "bos_token_id"),
    ({"pad_token_id": "0"}, "pad_token_id"),
    ({"model_type": "llama"}, "model_type"),
])
def test_constructor_rejects_bad_fields(change, field):
    fields = {k: v for k, v in BASE.items() if k != "model_type"}
    with pytest.raises(ConfigError, match=field):
        Qwen3Config(**{**fields, **change})


def test_constructor_normalises_numbers_and_sequences():
    fields = {k: v for k, v in BASE.items() if k != "model_type"}
    cfg = Qwen3Config(**{**fields, "rope_theta": 10000, "eos_token_ids": [1, 2]})
    assert cfg.rope_theta == 10000.0 and type(cfg.rope_theta) is float and cfg.eos_token_ids == (1, 2)
    hash(cfg)


def test_head_overrides_and_target_checks():
    from eagle3_jax.config import Eagle3Config

    head = parse_eagle3(HEAD_BASE)
    for theta in (NAN, INF, -1.0, 0, 1.0, 1e13, "1e4", True, [1e4]):
        with pytest.raises(ConfigError, match=re.escape("rope_theta (override) must be a finite number")):
            head.with_overrides(rope_theta=theta)
    for layers in ([1, "2", 3], [1.0, 2, 3], [True, 2, 3], [-1, 2, 3], [1, 2, 5000], 3, "1,2,3", {"a": 1}):
        with pytest.raises(ConfigError, match=re.escape("feature_layers (override) must be a list of layer indices")):
            head.with_overrides(feature_layers=layers)
    np = pytest.importorskip("numpy")
    fixed = head.with_overrides(rope_theta=np.float32(5e5), feature_layers=np.array([2, 3, 4]))
    assert fixed.rope_theta == 5e5 and fixed.aux_layer_ids == (1, 2, 3) and type(fixed.aux_layer_ids[0]) is int
    target = target_config_from_hf({**BASE, "num_hidden_layers": 4}, among=QWEN)
    head.with_overrides(feature_layers=(0, 1, 3)).check_target(target)  # layer 0: the embedding output
    with pytest.raises(ConfigError, match=re.escape("feature layers [4] are outside the target's 4 layers")):
        head.with_overrides(feature_layers=(0, 1, 4)).check_target(target)
    with pytest.raises(ConfigError, match="needs 3 feature layers"):
        head.with_overrides(feature_layers=(1, 2)).check_target(target)
    with pytest.raises(ConfigError, match="outside the target's 2 layers"):  # default (2, L//2, L-3) on 2 layers
        parse_eagle3({**HEAD_BASE, "eagle_config": None}).check_target(
            target_config_from_hf({**BASE, "num_hidden_layers": 2}, among=QWEN))
    with pytest.raises(ConfigError, match="aux_layer_ids"):
        Eagle3Config(**{**head.__dict__, "aux_layer_ids": (0, "1", 2)})
    with pytest.raises(ConfigError, match="outside the target's 2 layers"):
        Eagle3Config.for_target(target_config_from_hf({**BASE, "num_hidden_layers": 2}, among=QWEN))
    with pytest.raises(ConfigError, match="feature_layers"):
        Eagle3Config.for_target(target, feature_layers=(1, "2", 3))
    assert Eagle3Config.for_target(target, feature_layers=(1, 2, 3)).aux_layer_ids == (0, 1, 2)
