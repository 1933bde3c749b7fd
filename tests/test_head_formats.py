"""EAGLE-3 heads in every format they are published in, on a Llama target.

The same fitted head is written as SpecForge / SGLang (``LlamaForCausalLMEagle3``,
model.safetensors, ``midlayer.*``), as the EAGLE authors publish theirs
(``LlamaForCausalLM`` config with draft_vocab_size, float16 ``pytorch_model.bin``,
no embedding) and in vLLM's ``speculators`` format (``Eagle3Speculator``,
``transformer_layer_config``, ``layers.0.*``, ``norm_before_residual``). Each
loads to the same head, and speculative greedy decoding with each equals plain
greedy decoding token for token. ``norm_before_residual`` is checked against
the PyTorch reference head (tests/eagle3_reference.py).
"""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from eagle3_reference import RefEagle3
from safetensors.numpy import load_file, save_file
from spec_helpers import fit_head

from eagle3_jax import CheckpointError, ConfigError, Eagle3Config, Generator, load_draft, load_target
from eagle3_jax.attention import AttentionMetadata
from eagle3_jax.hf_heads import eagle3_to_hf, head_format, parse_eagle3
from eagle3_jax.kv_cache import KVCache
from eagle3_jax.loading import save_draft
from eagle3_jax.weights.params import flat_params

KNOBS = dict(num_steps=4, topk=2, num_draft_tokens=6)


@pytest.fixture(scope="module")
def llama(hf_llama):
    return load_target(hf_llama.path, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def head(llama):
    """A head fitted to the Llama target, with plain RoPE (the EAGLE authors' format can not express llama3)."""
    cfg = dataclasses.replace(Eagle3Config.for_target(llama.config, draft_vocab_size=llama.config.vocab_size),
                              rope_scaling=None)
    fitted, _ = fit_head(llama, config=cfg, num_seqs=24, steps=150)  # test_speculative's fit: accepted runs
    return fitted


def _tensors(head, tmp) -> dict[str, np.ndarray]:
    """The head's tensors under SpecForge names (float32)."""
    path = save_draft(head, os.path.join(tmp, "specforge-f32"), dtype="float32", overwrite=True)
    return load_file(os.path.join(path, "model.safetensors"))


def write_specforge(head, path, embedding):
    return save_draft(head, path, embedding=embedding, dtype="float32")


def write_eagle(head, path, tmp):
    """The EAGLE authors' layout: float16 pytorch_model.bin, no embedding, no d2t/t2d for a full vocabulary."""
    cfg = head.config
    os.makedirs(path)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
              "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
              "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
              "max_position_embeddings": 2048, "vocab_size": cfg.vocab_size, "draft_vocab_size": cfg.draft_vocab_size,
              "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 5}
    assert cfg.rope_theta == 10000.0  # their config has no rope_theta: the code's default
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    state = {k: torch.from_numpy(v).to(torch.float16) for k, v in _tensors(head, tmp).items()
             if k not in ("d2t", "t2d", "embed_tokens.weight")}
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    return path


def write_speculators(head, path, tmp, embedding, *, norm_before_residual=False):
    """vllm-project/speculators' Eagle3Speculator layout."""
    cfg = head.config
    os.makedirs(path)
    layers = cfg.feature_layers(None) if cfg.aux_layer_ids is not None else None
    config = {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "speculators_version": "0.3.0",
        "draft_vocab_size": cfg.draft_vocab_size, "norm_before_residual": norm_before_residual,
        "norm_before_fc": False, "fc_norm": False, "norm_output": False, "embed_requires_grad": False,
        "target_hidden_size": cfg.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(layers) if layers else None,  # speculators: HF indices
        "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                               "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                               "verifier": {"name_or_path": "tiny-llama", "architectures": ["LlamaForCausalLM"]}},
        "transformer_layer_config": {
            "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": 1,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": 2048,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "attention_bias": False,
            "mlp_bias": False, "tie_word_embeddings": False},
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    tensors = {k.replace("midlayer.", "layers.0."): v for k, v in _tensors(head, tmp).items()
               if k not in ("d2t", "t2d")}
    tensors["embed_tokens.weight"] = np.asarray(embedding, np.float32)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def formats(llama, head, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("formats"))
    emb = np.asarray(llama.model.embed_tokens.embedding[...])
    return {
        "specforge": write_specforge(head, os.path.join(tmp, "specforge"), emb),
        "eagle": write_eagle(head, os.path.join(tmp, "eagle"), tmp),
        "speculators": write_speculators(head, os.path.join(tmp, "speculators"), tmp, emb),
    }


@pytest.mark.slow
def test_formats_are_detected(formats):
    for fmt, path in formats.items():
        with open(os.path.join(path, "config.json")) as f:
            assert head_format(json.load(f)) == fmt


@pytest.mark.slow
def test_each_format_loads_the_same_head(llama, head, formats):
    want = {k: np.asarray(v[...]) for k, v in flat_params(head).items()}
    for fmt, path in formats.items():
        loaded = load_draft(path, llama.config, dtype="float32", progress=False)
        assert loaded.config.feature_layers(llama.config) == head.config.feature_layers(llama.config), fmt
        assert loaded.config.rope_theta == head.config.rope_theta and not loaded.config.norm_before_residual
        got = {k: np.asarray(v[...]) for k, v in flat_params(loaded).items()}
        assert got.keys() == want.keys(), fmt
        for k in want:
            tol = 2e-3 if fmt == "eagle" else 0  # the EAGLE authors publish float16
            np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol * np.abs(want[k]).max(),
                                       err_msg=f"{fmt} {k}")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["specforge", "eagle", "speculators"])
def test_speculative_equals_plain_for_each_format(llama, formats, fmt):
    rng = np.random.default_rng(11)
    prompts = [rng.integers(6, 97, size=n).tolist() for n in (6, 20, 33)]
    plain = Generator(llama).generate(prompts, max_new_tokens=24, stop_token_ids=())
    head = load_draft(formats[fmt], llama.config, dtype="float32", progress=False)
    spec = Generator(llama, head, **KNOBS).generate(prompts, max_new_tokens=24, stop_token_ids=())
    for p, s in zip(plain, spec):
        assert s.token_ids == p.token_ids
    assert np.mean([s.acceptance_length for s in spec]) > 1.3  # the fitted head is used, not bypassed


@pytest.mark.slow
def test_norm_before_residual_matches_the_reference(llama, head, formats, tmp_path):
    """speculators' norm_before_residual: the residual around attention is hidden_norm(h)."""
    emb = np.asarray(llama.model.embed_tokens.embedding[...])
    path = write_speculators(head, str(tmp_path / "nbr"), str(tmp_path), emb, norm_before_residual=True)
    nbr = load_draft(path, llama.config, dtype="float32", progress=False)
    assert nbr.config.norm_before_residual
    cfg = nbr.config
    ref = RefEagle3(dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                         intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                         draft_vocab_size=cfg.draft_vocab_size, target_hidden_size=cfg.target_hidden_size,
                         rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, norm_before_residual=True))
    sd = {k: torch.from_numpy(v) for k, v in _tensors(head, str(tmp_path)).items()}
    ref.load_state_dict(sd)
    rng = np.random.default_rng(5)
    b, t = 2, 7
    feats = rng.normal(size=(b, t, 3 * cfg.target_hidden_size)).astype(np.float32)
    embs = rng.normal(size=(b, t, cfg.hidden_size)).astype(np.float32)
    cache = KVCache.create(num_layers=1, batch=b, capacity=16, kv_heads=cfg.num_key_value_heads,
                           head_dim=cfg.head_dim, dtype=jnp.float32)
    meta = AttentionMetadata.causal(jnp.zeros((b,), jnp.int32), t)
    ours = nbr(jnp.asarray(embs), jnp.asarray(feats), cache, meta, hidden_is_features=True)
    with torch.no_grad():
        empty = torch.zeros(b, cfg.num_attention_heads, 0, cfg.head_dim)
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool))[None].expand(b, t, t)
        r_logits, r_g, _, _ = ref(torch.from_numpy(embs), torch.from_numpy(feats),
                                  torch.arange(t)[None].expand(b, t), empty, empty, causal, True)
    scale = np.abs(r_logits.numpy()).max()
    assert np.abs(np.asarray(ours.logits) - r_logits.numpy()).max() < 1e-4 * scale
    np.testing.assert_allclose(np.asarray(ours.hidden), r_g.numpy(), rtol=1e-4, atol=1e-4)
    plain = load_draft(formats["speculators"], llama.config, dtype="float32", progress=False)
    other = plain(jnp.asarray(embs), jnp.asarray(feats), cache, meta, hidden_is_features=True)
    assert np.abs(np.asarray(other.logits) - np.asarray(ours.logits)).max() > 1e-2 * scale  # the flag matters
    # lossless with it too
    prompts = [[7, 8, 9, 10, 11, 12]]
    want = Generator(llama).generate(prompts, max_new_tokens=16, stop_token_ids=())[0].token_ids
    got = Generator(llama, nbr, **KNOBS).generate(prompts, max_new_tokens=16, stop_token_ids=())[0].token_ids
    assert got == want
    with pytest.raises(ConfigError, match="norm_before_residual=true has no SpecForge"):
        save_draft(nbr, tmp_path / "export")


def _speculators_config(**changes):
    layer = {"model_type": "llama", "vocab_size": 97, "hidden_size": 40, "intermediate_size": 56,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12, "rope_theta": 10000.0}
    raw = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "draft_vocab_size": 32,
           "transformer_layer_config": layer}
    for k, v in changes.items():
        if k.startswith("layer."):
            layer[k[6:]] = v
        else:
            raw[k] = v
    return raw


@pytest.mark.parametrize("raw, layers", [
    (_speculators_config(eagle_aux_hidden_state_layer_ids=[2, 16, 29]), (2, 16, 29)),  # speculators: inputs of layer k
    ({"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1, "hidden_size": 40,
      "intermediate_size": 56, "num_attention_heads": 4, "vocab_size": 97, "rope_theta": 1e4,
      "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 15, 28]}}, (2, 16, 29)),  # SpecForge: outputs
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1, "hidden_size": 40,
      "intermediate_size": 56, "num_attention_heads": 4, "vocab_size": 97, "draft_vocab_size": 32}, (2, 16, 29)),
])
def test_feature_layers_mean_the_same_in_every_format(raw, layers):
    from eagle3_jax.config import LlamaConfig

    target = LlamaConfig(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=32,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=10, rope_theta=1e4)
    assert parse_eagle3(raw).feature_layers(target) == layers


@pytest.mark.parametrize("raw, message", [
    (_speculators_config(norm_before_fc=True), "norm_before_fc=true is not supported"),
    (_speculators_config(norm_output=True), "norm_output=true is not supported"),
    (_speculators_config(speculators_model_type="eagle"), "not an EAGLE-3 head"),
    (_speculators_config(**{"layer.model_type": "qwen3"}), "model_type 'qwen3' is not supported for the head"),
    (_speculators_config(**{"layer.attention_bias": True}), "attention_bias=true is not supported"),
    (_speculators_config(**{"layer.hidden_size": None}),
     "transformer_layer_config: missing required key(s): hidden_size"),
    ({k: v for k, v in _speculators_config().items() if k != "transformer_layer_config"},
     "missing required key(s): transformer_layer_config"),
])
def test_speculators_config_errors(raw, message):
    raw = json.loads(json.dumps(raw))
    raw["transformer_layer_config"] = {k: v for k, v in raw.get("transformer_layer_config", {}).items()
                                       if v is not None} or raw.get("transformer_layer_config")
    if "transformer_layer_config" in raw and raw["transformer_layer_config"] is None:
        del raw["transformer_layer_config"]
    with pytest.raises(ConfigError) as e:
        parse_eagle3(raw, where="head.json")
    assert message in str(e.value) and str(e.value).startswith("head.json")


@pytest.mark.slow
def test_a_pickle_that_is_not_a_state_dict_is_refused(formats, tmp_path):
    import shutil

    path = tmp_path / "eagle"
    shutil.copytree(formats["eagle"], path)
    torch.save({"fc.weight": "not a tensor"}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_draft(path, progress=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"fc.weight": Evil()}, path / "pytorch_model.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(CheckpointError, match="not a readable PyTorch state dict"):
        load_draft(path, progress=False)


def test_rope_theta_override_makes_the_heads_rope_plain():
    from eagle3_jax.config import RopeScaling

    cfg = Eagle3Config(hidden_size=40, intermediate_size=56, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                       vocab_size=97, draft_vocab_size=97, target_hidden_size=40, rope_theta=5e5,
                       rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    out = cfg.with_overrides(rope_theta=10000)
    assert out.rope_theta == 10000.0 and out.rope_scaling is None
    assert cfg.with_overrides(feature_layers=(1, 2, 3)).rope_scaling == cfg.rope_scaling
    assert parse_eagle3(eagle3_to_hf(cfg)) == cfg  # the SpecForge export keeps the scaling


def test_eagle_format_without_rope_theta_still_refuses_unsupported_scaling():
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1, "hidden_size": 40,
           "intermediate_size": 56, "num_attention_heads": 4, "vocab_size": 97, "draft_vocab_size": 32}
    assert parse_eagle3(raw).rope_theta == 10000.0
    with pytest.raises(ConfigError, match="rope type 'linear'"):
        parse_eagle3({**raw, "rope_scaling": {"type": "linear", "factor": 2.0}})
    layer_null = _speculators_config(**{"layer.model_type": None})
    assert parse_eagle3(layer_null).draft_vocab_size == 32  # null model_type means absent


def test_tensors_without_an_array_form_are_a_checkpoint_error(tmp_path):
    from eagle3_jax.weights.torch_bin import bin_to_safetensors

    torch.save({"fc.weight": torch.zeros(2, 2, dtype=torch.float8_e4m3fn)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="tensor 'fc.weight' .* can not be read as an array"):
        bin_to_safetensors(str(tmp_path / "pytorch_model.bin"), str(tmp_path / "out.safetensors"))


def test_hub_downloads_fetch_the_bin_only_for_draft_heads(monkeypatch):
    import huggingface_hub

    from eagle3_jax.hub import resolve_model_dir

    seen = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns: seen.append(allow_patterns) or "/nowhere")
    resolve_model_dir("org/target")
    resolve_model_dir("org/head", draft=True)
    assert "pytorch_model.bin" not in seen[0] and "pytorch_model.bin" in seen[1]
    assert not any(p.endswith((".pt", "*.bin")) for p in seen[1])
