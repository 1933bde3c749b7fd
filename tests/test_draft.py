"""The EAGLE-3 draft head: config, checkpoint format, parity with a PyTorch reference."""

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from eagle3_reference import RefEagle3, make_reference_head
from safetensors.torch import load_file as torch_load_file

from eagle3_jax import CheckpointError, ConfigError, KVCache, Qwen3Config
from eagle3_jax.attention import AttentionMetadata
from eagle3_jax.hf_heads import eagle3_to_hf, parse_eagle3, read_eagle3_config
from eagle3_jax.kv_cache import append_slots, causal_mask
from eagle3_jax.loading import convert_draft, load_draft, save_draft
from eagle3_jax.training.ttt_attention import ttt_mask, ttt_step
from eagle3_jax.weights.params import flat_params
from eagle3_jax.weights.safetensors_io import SafetensorsFile, save_file

REL_TOL = 1e-4
TARGET = Qwen3Config(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=6,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=1e4)


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def ref_head(tmp_path_factory):
    path = tmp_path_factory.mktemp("head")
    ref, ids = make_reference_head(path, rope_theta=5e5, aux_layer_ids=(0, 2, 3))
    return str(path), ref, ids


def draft_cache(head, batch, capacity=32):
    c = head.config
    return KVCache.create(num_layers=1, batch=batch, capacity=capacity, kv_heads=c.num_key_value_heads,
                          head_dim=c.head_dim, dtype=jnp.float32)


# ---------------------------------------------------------------- config

def test_config_fields(ref_head):
    cfg = read_eagle3_config(ref_head[0])
    assert cfg.head_dim == 12  # read, not 40 / 4
    assert (cfg.draft_vocab_size, cfg.vocab_size, cfg.target_hidden_size) == (31, 97, 40)
    assert cfg.rope_theta == 5e5
    assert cfg.feature_layers(TARGET) == (1, 3, 4)  # eagle_aux_hidden_state_layer_ids + 1
    hash(cfg)  # a static jit argument


def test_default_feature_layers_and_overrides(tmp_path):
    make_reference_head(tmp_path)
    cfg = read_eagle3_config(tmp_path)
    assert cfg.feature_layers(TARGET) == (2, 3, 3)  # [2, L//2, L-3] for L = 6
    assert cfg.feature_layers(Qwen3Config.qwen3_4b_thinking_2507()) == (2, 18, 33)
    fixed = cfg.with_overrides(rope_theta=10000, feature_layers=(2, 17, 33))
    assert fixed.rope_theta == 10000.0 and fixed.feature_layers(TARGET) == (2, 17, 33)
    assert eagle3_to_hf(fixed)["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [1, 16, 32]}


def test_config_round_trip(ref_head):
    cfg = read_eagle3_config(ref_head[0])
    assert parse_eagle3(eagle3_to_hf(cfg)) == cfg


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"]}, "not an EAGLE-3 draft head"),
    ({"num_hidden_layers": 2}, "only single-layer"),
    ({"fc_norm": True}, "fc_norm=true is not supported"),
    ({"draft_vocab_size": 200}, "draft_vocab_size (200) exceeds vocab_size (97)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3'"),
    ({"hidden_size": None}, "missing required key(s): hidden_size"),
])
def test_config_errors(tmp_path, change, message):
    make_reference_head(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        parse_eagle3(raw)
    assert message in str(e.value)


@pytest.mark.parametrize("target_change, message", [
    ({"hidden_size": 48}, "target_hidden_size"),
    ({"vocab_size": 151936}, "vocab_size 97 differs from the target's 151936"),
    ({"num_hidden_layers": 3}, "feature layers [3, 4] are outside the target's 3 layers"),
])
def test_mismatched_target(ref_head, target_change, message):
    import dataclasses

    target = dataclasses.replace(TARGET, **target_change)
    with pytest.raises(ConfigError) as e:
        load_draft(ref_head[0], target, progress=False)
    assert message in str(e.value)


# ------------------------------------------------------------------ files

def test_weights_and_vocab_map_equal_the_checkpoint(ref_head):
    path, ref, ids = ref_head
    head = load_draft(path, TARGET, dtype="float32", progress=False)
    ours = flat_params(head)
    for name, tensor in ref.state_dict().items():
        key = {"d2t": "d2t", "t2d": "t2d"}.get(name)
        if key is None:
            key = name.replace(".weight", ".kernel" if "proj" in name or name in ("fc.weight", "lm_head.weight")
                               else ".weight")
        value = tensor.numpy()
        if value.ndim == 2:
            value = value.T
        np.testing.assert_array_equal(np.asarray(ours[key][...]), value, err_msg=name)
    np.testing.assert_array_equal(np.asarray(head.to_target_ids(jnp.arange(31))), ids)
    assert head.d2t[...].dtype == jnp.int32 and head.t2d[...].dtype == jnp.bool_


def _rewrite(path, edit):
    f = SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors = {k: f.read(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("midlayer.hidden_norm.weight"), "missing tensors (1): midlayer.hidden_norm.weight"),
    (lambda t: t.pop("d2t"), "missing tensors (1): d2t"),
    (lambda t: t.__setitem__("midlayer.extra.weight", np.zeros(3, np.float32)), "unexpected tensors (1)"),
    (lambda t: t.__setitem__("d2t", t["d2t"].astype(np.int32)), "'d2t' has dtype int32 but int64 is expected"),
    (lambda t: t.__setitem__("t2d", t["t2d"].astype(np.uint8)), "'t2d' has dtype uint8 but bool is expected"),
    (lambda t: t.__setitem__("lm_head.weight", np.zeros((32, 40), np.float32)),
     "'lm_head.weight' has shape [32, 40] but the config expects [31, 40]"),
    (lambda t: t.__setitem__("fc.weight", np.zeros((40, 40), np.float32)),
     "'fc.weight' has shape [40, 40] but the config expects [40, 120]"),
    (lambda t: t["d2t"].__setitem__(30, 500), "outside the vocabulary [0, 97)"),
    (lambda t: t["t2d"].__setitem__(np.flatnonzero(t["t2d"])[0], False), "t2d (30 target ids marked) does not match"),
])
def test_bad_checkpoints(ref_head, tmp_path, edit, message):
    path = shutil.copytree(ref_head[0], tmp_path / "h")
    _rewrite(path, edit)
    with pytest.raises(CheckpointError) as e:
        load_draft(path, TARGET, progress=False)
    assert message in str(e.value)


def test_own_embedding_is_skipped_unless_kept(tmp_path):
    make_reference_head(tmp_path, with_embedding=True)
    assert load_draft(tmp_path, TARGET, progress=False).embed_tokens is None
    kept = load_draft(tmp_path, TARGET, keep_embedding=True, progress=False)
    expected = torch_load_file(os.path.join(tmp_path, "model.safetensors"))["embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(kept.embed_tokens.embedding[...]), expected)


def test_save_load_is_bit_identical_and_speaks_the_format(ref_head, tmp_path):
    path = ref_head[0]
    head = load_draft(path, TARGET, dtype="bfloat16", progress=False)
    out = save_draft(head, tmp_path / "exported")
    f = SafetensorsFile(os.path.join(out, "model.safetensors"))
    assert f.dtype("d2t") == np.int64 and f.dtype("t2d") == np.bool_
    assert f.dtype("fc.weight") == np.dtype(ml_dtypes.bfloat16)
    again = load_draft(out, TARGET, dtype="bfloat16", progress=False)
    a, b = flat_params(head), flat_params(again)
    assert set(a) == set(b)
    for k in a:
        x, y = np.asarray(a[k][...]), np.asarray(b[k][...])
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), k
    # The exported file loads strictly into the reference module (SpecForge's names and shapes).
    cfg = json.loads(open(os.path.join(out, "config.json")).read())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 31
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]
    ref = RefEagle3({**cfg, "target_hidden_size": 40})
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v
                         for k, v in torch_load_file(os.path.join(out, "model.safetensors")).items()}, strict=True)
    with pytest.raises(CheckpointError, match="already exists"):
        save_draft(head, out)


def test_export_with_target_embedding(ref_head, tmp_path):
    head = load_draft(ref_head[0], TARGET, progress=False)
    emb = np.random.default_rng(0).normal(size=(97, 40)).astype(np.float32)
    out = save_draft(head, tmp_path / "e", embedding=emb)
    f = SafetensorsFile(os.path.join(out, "model.safetensors"))
    np.testing.assert_array_equal(f.read("embed_tokens.weight"), emb.astype(ml_dtypes.bfloat16))
    assert load_draft(out, TARGET, progress=False).embed_tokens is None


def test_convert_draft_round_trip(ref_head, tmp_path):
    out = convert_draft(ref_head[0], tmp_path / "c", dtype="float32", progress=False)
    a = flat_params(load_draft(ref_head[0], TARGET, dtype="float32", progress=False))
    b = flat_params(load_draft(out, TARGET, dtype="float32", progress=False))
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k][...]), np.asarray(b[k][...]), err_msg=k)


# ----------------------------------------------------------------- parity

@pytest.mark.slow
def test_extend_then_drafting_steps_match_reference(ref_head):
    path, ref, ids = ref_head
    head = load_draft(path, TARGET, dtype="float32", progress=False)
    rng = np.random.default_rng(0)
    b, t, steps = 2, 7, 4
    feats = rng.normal(size=(b, t, 120)).astype(np.float32)
    embs = rng.normal(size=(b, t + steps, 40)).astype(np.float32)

    # extend over target features at positions 0..t-1
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = draft_cache(head, b)
    out = head(jnp.asarray(embs[:, :t]), jnp.asarray(feats), cache,
               AttentionMetadata.dense(pos, pos, causal_mask(jnp.zeros(b, jnp.int32), t, 32)), hidden_is_features=True)
    with torch.no_grad():
        empty = torch.zeros(b, 4, 0, 12)
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool))[None].expand(b, t, t)
        r_logits, r_g, keys, values = ref(torch.from_numpy(embs[:, :t]), torch.from_numpy(feats),
                                          torch.from_numpy(np.array(pos)), empty, empty, causal, True)
    assert rel_err(out.logits, r_logits.numpy()) < REL_TOL
    assert rel_err(out.hidden, r_g.numpy()) < REL_TOL

    # drafting steps: feed back g of the last position
    cache = out.cache.with_lengths(jnp.full((b,), t, jnp.int32))
    g, r = out.hidden[:, -1:], r_g[:, -1:]
    for s in range(steps):
        lengths = cache.lengths
        out = head(jnp.asarray(embs[:, t + s: t + s + 1]), g, cache,
                   AttentionMetadata.dense(lengths[:, None], append_slots(lengths, 1), causal_mask(lengths, 1, 32)),
                   hidden_is_features=False)
        with torch.no_grad():
            r_logits, r, keys, values = ref(torch.from_numpy(embs[:, t + s: t + s + 1]), r,
                                            torch.full((b, 1), t + s), keys, values,
                                            torch.ones(b, 1, t + s + 1, dtype=torch.bool), False)
        assert rel_err(out.logits, r_logits.numpy()) < REL_TOL, s
        assert rel_err(out.hidden, r.numpy()) < REL_TOL, s
        cache, g = out.cache.with_lengths(lengths + 1), out.hidden
    # draft logits map to target ids through d2t
    top = np.asarray(jnp.argmax(out.logits[:, 0], -1))
    np.testing.assert_array_equal(np.asarray(head.to_target_ids(jnp.asarray(top))), ids[top])


@pytest.mark.slow
def test_tree_step_attends_to_ancestors_only(ref_head):
    """Two siblings in one forward (each sees the prefix and itself) equal two separate chains."""
    path, ref, _ = ref_head
    head = load_draft(path, TARGET, dtype="float32", progress=False)
    rng = np.random.default_rng(1)
    t = 5
    feats = rng.normal(size=(1, t, 120)).astype(np.float32)
    embs = rng.normal(size=(1, t + 2, 40)).astype(np.float32)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    out = head(jnp.asarray(embs[:, :t]), jnp.asarray(feats), draft_cache(head, 1),
               AttentionMetadata.dense(pos, pos, causal_mask(jnp.zeros(1, jnp.int32), t, 32)), hidden_is_features=True)
    cache = out.cache.with_lengths(jnp.array([t], jnp.int32))
    g = jnp.repeat(out.hidden[:, -1:], 2, axis=1)
    mask = np.zeros((1, 2, 32), bool)
    mask[0, :, :t] = True
    mask[0, 0, t], mask[0, 1, t + 1] = True, True
    sib = head(jnp.asarray(embs[:, t:]), g, cache,
               AttentionMetadata.dense(jnp.full((1, 2), t, jnp.int32), append_slots(cache.lengths, 2),
                                       jnp.asarray(mask)),
               hidden_is_features=False)
    for i in range(2):
        chain = head(jnp.asarray(embs[:, t + i: t + i + 1]), out.hidden[:, -1:], cache,
                     AttentionMetadata.dense(jnp.full((1, 1), t, jnp.int32), append_slots(cache.lengths, 1),
                                             causal_mask(cache.lengths, 1, 32)),
                     hidden_is_features=False)
        assert rel_err(sib.logits[:, i], chain.logits[:, 0]) < 1e-5


@pytest.mark.slow
def test_training_time_test_pattern_matches_specforge(ref_head):
    """Unrolled TTT steps through the module with ``ttt_mask`` equal SpecForge's cache_hidden attention."""
    path, ref, _ = ref_head
    head = load_draft(path, TARGET, dtype="float32", progress=False)
    rng = np.random.default_rng(2)
    b, t, ttt = 2, 6, 3
    feats = rng.normal(size=(b, t, 120)).astype(np.float32)
    embs = [rng.normal(size=(b, t, 40)).astype(np.float32) for _ in range(ttt)]
    cache = draft_cache(head, b, capacity=ttt * t)
    base = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache_hidden = [[], []]
    hidden, r_hidden = jnp.asarray(feats), torch.from_numpy(feats)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))[None].expand(b, t, t)
    for step in range(ttt):
        mask = jnp.broadcast_to(ttt_mask(t, step, ttt), (b, t, ttt * t))
        out = head(jnp.asarray(embs[step]), hidden, cache, AttentionMetadata.dense(base + step, base + step * t, mask),
                   hidden_is_features=step == 0)
        with torch.no_grad():
            r_logits, r_hidden = ref.ttt_step(torch.from_numpy(embs[step]), r_hidden,
                                              torch.from_numpy(np.array(base)) + step, cache_hidden, causal,
                                              step == 0)
        assert rel_err(out.logits, r_logits.numpy()) < REL_TOL, step
        cache, hidden = out.cache, out.hidden


def test_ttt_mask_layout():
    m = np.asarray(ttt_mask(3, 2, 3))[0].astype(int)
    np.testing.assert_array_equal(m, [[1, 0, 0, 1, 0, 0, 1, 0, 0],
                                      [1, 1, 0, 0, 1, 0, 0, 1, 0],
                                      [1, 1, 1, 0, 0, 1, 0, 0, 1]])
    m1 = np.asarray(ttt_mask(3, 1, 3))[0]
    assert not m1[:, 6:].any()


def test_convert_cli_for_drafts(ref_head, tmp_path, capsys):
    from eagle3_jax.cli import main

    assert main(["convert", "--head", ref_head[0], str(tmp_path / "d"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "draft"
    assert load_draft(tmp_path / "d", TARGET, progress=False).config.draft_vocab_size == 31
    assert main(["convert", ref_head[0], str(tmp_path / "t")]) == 1  # a head is not a target
    assert "an EAGLE-3 draft head's config" in capsys.readouterr().err


@pytest.mark.slow
def test_ttt_step_equals_the_masked_cache_form_and_specforge(ref_head):
    """The efficient training path (``ttt_step``) computes what ``ttt_mask`` over a cache computes,
    padding included, and what SpecForge's ``cache_hidden`` attention computes."""
    from eagle3_jax.training.ttt_attention import TTTHistory

    path, ref, _ = ref_head
    head = load_draft(path, TARGET, dtype="float32", progress=False)
    rng = np.random.default_rng(3)
    b, t, ttt = 2, 7, 4
    feats = rng.normal(size=(b, t, 120)).astype(np.float32)
    embs = [rng.normal(size=(b, t, 40)).astype(np.float32) for _ in range(ttt)]
    valid = np.ones((b, t), bool)
    valid[1, 5:] = False  # row 1 is padded after 5 tokens
    base = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = draft_cache(head, b, capacity=ttt * t)
    history, hidden, hidden_ref = TTTHistory(), jnp.asarray(feats), jnp.asarray(feats)
    cache_hidden, r_hidden = [[], []], torch.from_numpy(feats)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))[None] & torch.from_numpy(valid)[:, None, :]
    for step in range(ttt):
        logits, hidden, history = ttt_step(head, jnp.asarray(embs[step]), hidden, base + step, history,
                                           jnp.asarray(valid), hidden_is_features=step == 0)
        out = head(jnp.asarray(embs[step]), hidden_ref, cache,
                   AttentionMetadata.dense(base + step, base + step * t, ttt_mask(t, step, ttt, jnp.asarray(valid))),
                   hidden_is_features=step == 0)
        cache, hidden_ref = out.cache, out.hidden
        with torch.no_grad():
            r_logits, r_hidden = ref.ttt_step(torch.from_numpy(embs[step]), r_hidden,
                                              torch.from_numpy(np.array(base)) + step, cache_hidden, causal,
                                              step == 0)
        keep = valid[..., None]
        assert rel_err(np.where(keep, logits, 0), np.where(keep, out.logits, 0)) < 1e-5, step
        assert rel_err(np.where(keep, logits, 0), np.where(keep, r_logits.numpy(), 0)) < REL_TOL, step
