"""Per-layer, logits and KV-cache parity with HF transformers (float32, CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from eagle3_jax import KVCache, load_target
from eagle3_jax.attention import AttentionMetadata
from eagle3_jax.kv_cache import append_slots, causal_mask

REL_TOL = 1e-4


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def new_cache(model, batch, capacity=64):
    c = model.config
    return KVCache.create(num_layers=c.num_hidden_layers, batch=batch, capacity=capacity,
                          kv_heads=c.num_key_value_heads, head_dim=c.head_dim, dtype=jnp.float32)


def full_forward(model, ids, capacity=64, **kw):
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    zeros = jnp.zeros((b,), jnp.int32)
    return model(jnp.asarray(ids, jnp.int32), new_cache(model, b, capacity),
                 AttentionMetadata.dense(pos, pos, causal_mask(zeros, t, capacity)), **kw)


def hf_forward(hf, ids):
    with torch.no_grad():
        return hf.model(torch.tensor(ids), output_hidden_states=True)


@pytest.mark.slow
def test_every_layer_and_logits_match_hf(hf_any):
    model = load_target(hf_any.path, dtype="float32", progress=False)
    ids = np.random.default_rng(0).integers(0, hf_any.config.vocab_size, size=(3, 13))
    layers = tuple(range(model.config.num_hidden_layers))
    out = full_forward(model, ids, feature_layers=layers)
    ref = hf_forward(hf_any, ids)
    h = model.config.hidden_size
    for i in layers:
        err = rel_err(out.features[..., i * h:(i + 1) * h], ref.hidden_states[i].numpy())
        assert err < REL_TOL, (i, err)
    err = rel_err(out.logits, ref.logits.numpy())
    assert err < REL_TOL, err


@pytest.mark.slow
def test_features_are_hf_hidden_states_at_feature_layers(hf_qwen3):
    model = load_target(hf_qwen3.path, dtype="float32", progress=False)
    ids = np.random.default_rng(1).integers(0, 97, size=(2, 9))
    ref = hf_forward(hf_qwen3, ids)
    for layers in [model.config.default_feature_layers, (3, 0, 1)]:
        out = full_forward(model, ids, feature_layers=layers)
        assert out.features.shape == (2, 9, len(layers) * 40)
        expected = np.concatenate([ref.hidden_states[i].numpy() for i in layers], axis=-1)
        assert rel_err(out.features, expected) < REL_TOL
    with pytest.raises(ValueError, match="feature layer 4 is out of range"):
        full_forward(model, ids, feature_layers=(4,))


@pytest.mark.slow
def test_logits_indices_select_rows(hf_qwen3):
    model = load_target(hf_qwen3.path, dtype="float32", progress=False)
    ids = np.random.default_rng(2).integers(0, 97, size=(2, 10))
    full = full_forward(model, ids).logits
    rows = jnp.array([[9, 0], [3, 3]], jnp.int32)
    picked = full_forward(model, ids, logits_indices=rows).logits
    np.testing.assert_allclose(picked, np.take_along_axis(np.asarray(full), np.asarray(rows)[:, :, None], 1),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_incremental_decode_with_ragged_prompts_matches_hf(hf_any):
    """Prefill right-padded prompts of different lengths, then decode token by token through the cache."""
    model = load_target(hf_any.path, dtype="float32", progress=False)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, hf_any.config.vocab_size, size=n) for n in (14, 9)]
    prompt_lens = np.array([5, 2])
    bucket, capacity = 8, 32
    tokens = np.zeros((2, bucket), np.int32)
    for i, n in enumerate(prompt_lens):
        tokens[i, :n] = seqs[i][:n]
    pos = jnp.broadcast_to(jnp.arange(bucket, dtype=jnp.int32), (2, bucket))
    zeros = jnp.zeros((2,), jnp.int32)
    out = model(jnp.asarray(tokens), new_cache(model, 2, capacity),
                AttentionMetadata.dense(pos, pos, causal_mask(zeros, bucket, capacity)),
                logits_indices=jnp.asarray(prompt_lens - 1)[:, None])
    got = [[out.logits[i, 0]] for i in range(2)]
    cache = out.cache.with_lengths(jnp.asarray(prompt_lens, jnp.int32))
    for _ in range(6):
        lengths = cache.lengths
        nxt = np.array([seqs[i][int(lengths[i])] for i in range(2)], np.int32)[:, None]
        out = model(jnp.asarray(nxt), cache,
                    AttentionMetadata.dense(lengths[:, None], append_slots(lengths, 1),
                                            causal_mask(lengths, 1, capacity)))
        cache = out.cache.with_lengths(lengths + 1)
        for i in range(2):
            got[i].append(out.logits[i, 0])
    for i in range(2):
        n = prompt_lens[i]
        ref = hf_forward(hf_any, seqs[i][None, : n + 6]).logits[0].numpy()
        assert rel_err(np.stack(got[i]), ref[n - 1: n + 6]) < REL_TOL


@pytest.mark.slow
def test_tree_mask_verification_matches_each_branch(hf_qwen3):
    """One forward over a token tree equals HF on each root-to-node path."""
    model = load_target(hf_qwen3.path, dtype="float32", progress=False)
    rng = np.random.default_rng(4)
    prefix = rng.integers(0, 97, size=6)
    tree = rng.integers(0, 97, size=5)
    parents = [-1, 0, 0, 1, 2]  # a root with two children, each with one child
    depth = [0, 1, 1, 2, 2]
    n, capacity = len(prefix), 32
    cache = new_cache(model, 1, capacity)
    p = jnp.arange(n, dtype=jnp.int32)[None]
    out = model(jnp.asarray(prefix[None], jnp.int32), cache,
                AttentionMetadata.dense(p, p, causal_mask(jnp.zeros(1, jnp.int32), n, capacity)))
    cache = out.cache.with_lengths(jnp.array([n], jnp.int32))
    anc = np.eye(5, dtype=bool)
    for i in range(5):
        j = parents[i]
        while j >= 0:
            anc[i, j] = True
            j = parents[j]
    mask = np.zeros((1, 5, capacity), bool)
    mask[0, :, :n] = True
    mask[0, :, n:n + 5] = anc
    out = model(jnp.asarray(tree[None], jnp.int32), cache,
                AttentionMetadata.dense(jnp.asarray(np.array(depth)[None] + n, jnp.int32),
                                        append_slots(cache.lengths, 5), jnp.asarray(mask)))
    for i in range(5):
        path, j = [], i
        while j >= 0:
            path.insert(0, tree[j])
            j = parents[j]
        ref = hf_forward(hf_qwen3, np.concatenate([prefix, path])[None]).logits[0, -1].numpy()
        assert rel_err(out.logits[0, i], ref) < REL_TOL, i


def test_writes_past_capacity_are_dropped():
    cache = KVCache.create(num_layers=1, batch=2, capacity=4, kv_heads=1, head_dim=2, dtype=jnp.float32)
    k = jnp.ones((2, 3, 1, 2))
    out = cache.write(0, k, 2 * k, jnp.array([[2, 3, 4], [5, 6, 7]], jnp.int32))
    np.testing.assert_array_equal(out.k[0][0, 0, :, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(out.k[0][1], np.zeros((1, 4, 2)))
    np.testing.assert_array_equal(out.v[0][0, 0, :, 1], [0, 0, 2, 2])


@pytest.mark.slow
def test_bfloat16_model_and_cache_stay_close_to_float32(hf_qwen3):
    """Not a parity claim (HF bf16 rounds differently), a sanity bound on the bf16 path."""
    f32 = load_target(hf_qwen3.path, dtype="float32", progress=False)
    bf16 = load_target(hf_qwen3.path, dtype="bfloat16", progress=False)
    ids = np.random.default_rng(5).integers(0, 97, size=(2, 12))
    ref = np.asarray(full_forward(f32, ids).logits)
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = KVCache.create(num_layers=4, batch=b, capacity=64, kv_heads=2, head_dim=12, dtype=jnp.bfloat16)
    out = bf16(jnp.asarray(ids, jnp.int32), cache,
               AttentionMetadata.dense(pos, pos, causal_mask(jnp.zeros(b, jnp.int32), t, 64)))
    assert out.logits.dtype == jnp.float32 and out.cache.dtype == jnp.bfloat16
    assert rel_err(out.logits, ref) < 3e-2
