import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import rewrite_safetensors

from eagle3_jax import CheckpointError, ConfigError, convert_target, load_target
from eagle3_jax.weights.params import flat_params
from eagle3_jax.weights.rules import qwen3_rules


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


_rewrite = rewrite_safetensors


def test_weights_equal_the_checkpoint(hf_any):
    ours = flat_params(load_target(hf_any.path, dtype="float32", progress=False))
    table = qwen3_rules(hf_any.config.tie_word_embeddings)
    checked = set()
    for name, tensor in hf_any.model.state_dict().items():
        if hf_any.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        path, rule = table.param_path(name)
        np.testing.assert_array_equal(np.asarray(ours[path][...]), rule.to_param(tensor.numpy()), err_msg=name)
        checked.add(path)
    assert checked == set(ours), set(ours) ^ checked


def test_dtype_cast_on_load(hf_qwen3):
    model = load_target(hf_qwen3.path, dtype="bfloat16", progress=False)
    assert model.dtype == jnp.bfloat16
    emb = hf_qwen3.model.state_dict()["model.embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(model.model.embed_tokens.embedding[...]),
                                  emb.astype(ml_dtypes.bfloat16))


def test_missing_tensor(hf_qwen3, tmp_path):
    d = _copy(hf_qwen3.path, tmp_path / "m")
    _rewrite(d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
        load_target(d, progress=False)


def test_unexpected_tensors(hf_qwen3, tmp_path):
    d = _copy(hf_qwen3.path, tmp_path / "u")

    def add(t):
        t["model.layers.7.mlp.up_proj.weight"] = np.zeros((56, 40), np.float32)  # layer 7 of 4
        t["vision_tower.weight"] = np.zeros(3, np.float32)

    _rewrite(d / "model.safetensors", add)
    with pytest.raises(CheckpointError) as e:
        load_target(d, progress=False)
    assert "unexpected tensors (2): model.layers.7.mlp.up_proj.weight, vision_tower.weight" in str(e.value)


def test_shape_mismatch_against_config(hf_qwen3, tmp_path):
    d = _copy(hf_qwen3.path, tmp_path / "s")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[40, 56\] "
                                              r"but the config expects \[40, 64\]"):
        load_target(d, progress=False)


def test_wrong_dtype_kind(hf_qwen3, tmp_path):
    d = _copy(hf_qwen3.path, tmp_path / "d")
    _rewrite(d / "model.safetensors",
             lambda t: t.__setitem__("model.norm.weight", np.ones(40, np.int64)))
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype int64"):
        load_target(d, progress=False)


def test_truncated_shard(hf_qwen3_sharded, tmp_path):
    d = _copy(hf_qwen3_sharded.path, tmp_path / "t")
    shards = sorted(p for p in os.listdir(d) if p.endswith(".safetensors"))
    assert len(shards) > 1
    data = (d / shards[-1]).read_bytes()
    (d / shards[-1]).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shards[-1]}: truncated file"):
        load_target(d, progress=False)


def test_missing_directory_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_target(tmp_path / "absent")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="downloading it from the Hugging Face Hub failed"):
        load_target("no-such-org/no-such-model-eagle3-jax-test")


def test_config_error_is_reported(hf_qwen3, tmp_path):
    d = _copy(hf_qwen3.path, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown model_type 'mistral'"):
        load_target(d)


def test_unknown_dtype(hf_qwen3):
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        load_target(hf_qwen3.path, dtype="float8")


# --------------------------------------------------------------- conversion

@pytest.mark.parametrize("fixture", ["hf_qwen3", "hf_qwen3_tied", "hf_qwen2"])
def test_convert_round_trip(fixture, request, tmp_path):
    hf = request.getfixturevalue(fixture)
    out = convert_target(hf.path, tmp_path / "conv", dtype="float32", progress=False)
    assert sorted(os.listdir(out)) == ["config.json", "eagle3_jax.json", "generation_config.json", "params"]
    direct = flat_params(load_target(hf.path, dtype="float32", progress=False))
    converted = flat_params(load_target(out, dtype="float32", progress=False))
    assert set(direct) == set(converted)
    for k in direct:
        np.testing.assert_array_equal(np.asarray(direct[k][...]), np.asarray(converted[k][...]), err_msg=k)


def test_convert_keeps_the_checkpoint_dtype(hf_qwen3, tmp_path):
    out = convert_target(hf_qwen3.path, tmp_path / "conv", progress=False)  # the float32 checkpoint stays float32
    assert json.loads((tmp_path / "conv" / "eagle3_jax.json").read_text())["dtype"] == "float32"
    w = hf_qwen3.model.state_dict()["model.layers.2.self_attn.o_proj.weight"].numpy()
    got = np.asarray(load_target(out, dtype="float32", progress=False).model.layers[2].self_attn.o_proj.kernel[...])
    np.testing.assert_array_equal(got, w.T)


def test_convert_bf16_then_load_f32(hf_qwen3, tmp_path):
    out = convert_target(hf_qwen3.path, tmp_path / "conv", dtype="bfloat16", progress=False)
    model = load_target(out, dtype="float32", progress=False)
    assert model.dtype == jnp.float32
    w = hf_qwen3.model.state_dict()["model.layers.2.self_attn.o_proj.weight"].numpy()
    got = np.asarray(model.model.layers[2].self_attn.o_proj.kernel[...])
    np.testing.assert_array_equal(got, w.T.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_convert_is_atomic_on_bad_input(hf_qwen3, tmp_path):
    d = _copy(hf_qwen3.path, tmp_path / "bad")
    _rewrite(d / "model.safetensors", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        convert_target(d, tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad"]


def test_convert_refuses_to_overwrite(hf_qwen3, tmp_path):
    out = convert_target(hf_qwen3.path, tmp_path / "conv", progress=False)
    with pytest.raises(CheckpointError, match="already exists"):
        convert_target(hf_qwen3.path, out, progress=False)
    convert_target(hf_qwen3.path, out, overwrite=True, progress=False)
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="not an output of eagle3-jax"):
        convert_target(hf_qwen3.path, tmp_path / "plain", overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["conv", "plain"]


def test_converted_params_must_match_config(hf_qwen3_tied, tmp_path):
    out = convert_target(hf_qwen3_tied.path, tmp_path / "conv", progress=False)
    cfg = json.loads((out_dir := tmp_path / "conv" / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    out_dir.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing: lm_head.kernel"):
        load_target(out, progress=False)
