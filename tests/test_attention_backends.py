"""The attention contract (docs/architecture.md#attention): what every backend must compute.

``AttentionMetadata`` says what each new token sees: the committed prefix
(slots below ``kv_lengths``) and, in the window of slots after it, what
``local_mask`` allows. Each backend in ``eagle3_jax.attention.BACKENDS`` is
run on the shapes decoding produces (prefill chunks, one-token decode, tree
verification, the draft head's beam steps) and compared with a per-query
NumPy implementation written from that definition, and with the reference
backend through whole model forwards. A new backend passes this file or is
not registered.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eagle3_jax import Qwen3Config, Qwen3ForCausalLM
from eagle3_jax.attention import BACKENDS, AttentionMetadata, attend, check_backend
from eagle3_jax.decoding.tree import Tree, ancestor_closure, verify_attention
from eagle3_jax.errors import InputError
from eagle3_jax.kv_cache import KVCache

B, HQ, HKV, D, CAP = 3, 4, 2, 8, 64


def numpy_attention(q, k_new, v_new, k_cache, v_cache, meta: AttentionMetadata):
    """Per query, from the definition: write the new K/V, then attend over visible slots."""
    k_cache, v_cache = np.array(k_cache, np.float64), np.array(v_cache, np.float64)
    slots = np.asarray(meta.slots)
    for b in range(B):
        for t in range(slots.shape[1]):
            s = slots[b, t]
            if 0 <= s < k_cache.shape[2]:
                k_cache[b, :, s], v_cache[b, :, s] = k_new[b, t], v_new[b, t]
    lengths, local = np.asarray(meta.kv_lengths), np.asarray(meta.local_mask)
    local = np.broadcast_to(local, (B,) + local.shape[1:])
    out = np.zeros(q.shape, np.float64)
    for b in range(B):
        for t in range(q.shape[1]):
            visible = [s for s in range(k_cache.shape[2])
                       if s < lengths[b] or (0 <= s - lengths[b] < local.shape[2] and local[b, t, s - lengths[b]])]
            for h in range(HQ):
                kv = h // (HQ // HKV)
                scores = np.array([q[b, t, h] @ k_cache[b, kv, s] for s in visible]) / np.sqrt(D)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[b, t, h] = sum(w * v_cache[b, kv, s] for w, s in zip(p, visible))
    return out, k_cache, v_cache


def cases():
    rng = np.random.default_rng(0)
    lengths = jnp.asarray([0, 5, 17], jnp.int32)
    # a prefill chunk of 8 tokens after each row's prefix (chunk 2 of a prompt, or a whole prompt at 0)
    yield "prefill chunk", AttentionMetadata.causal(lengths, 8)
    # padding keys hidden (a right-padded prompt in forward_sequence)
    valid = jnp.asarray(np.arange(6)[None, :] < np.array([[6], [3], [1]]))
    yield "prefill with padding", AttentionMetadata.causal(jnp.zeros((B,), jnp.int32), 6, valid=valid)
    # one-token decode, a finished row writes nothing
    yield "decode", AttentionMetadata.causal(lengths, 1, write=jnp.asarray([[True], [False], [True]]))
    # tree verification: N = 6 nodes at slots n + i, ancestors from random parents
    parents = np.zeros((B, 6), np.int32)
    for i in range(1, 6):
        parents[:, i] = rng.integers(0, i, size=B)
    depths = np.zeros((B, 6), np.int32)
    for i in range(1, 6):
        depths[:, i] = depths[np.arange(B), parents[:, i]] + 1
    tree = Tree(tokens=jnp.zeros((B, 6), jnp.int32), parents=jnp.asarray(parents), depths=jnp.asarray(depths),
                ancestors=ancestor_closure(jnp.asarray(parents), 5), draft_finite=jnp.ones((B,), bool))
    yield "tree verification", verify_attention(tree, lengths, jnp.asarray([True, True, False]))
    # a draft beam step: K = 3 tokens at window offsets 3..5 of a 9-slot window, each seeing its ancestry
    anc = rng.random((B, 3, 9)) < 0.4
    anc[:, np.arange(3), 3 + np.arange(3)] = True
    yield "draft beam step", AttentionMetadata.window_of(lengths, lengths[:, None] + jnp.asarray([[2, 2, 2]]),
                                                         jnp.asarray([[3, 4, 5]]), jnp.asarray(anc))


def _check_definition(backend, meta, capacity=CAP):
    """The backend's output and written cache equal the NumPy definition's on random inputs."""
    rng = np.random.default_rng(1)
    t = meta.num_tokens
    q = rng.normal(size=(B, t, HQ, D)).astype(np.float32)
    k_new, v_new = (rng.normal(size=(B, t, HKV, D)).astype(np.float32) for _ in range(2))
    cache = KVCache(k=(jnp.asarray(rng.normal(size=(B, HKV, capacity, D)), jnp.float32),),
                    v=(jnp.asarray(rng.normal(size=(B, HKV, capacity, D)), jnp.float32),),
                    lengths=meta.kv_lengths)
    out, new_cache = jax.jit(attend, static_argnums=4)(jnp.asarray(q), jnp.asarray(k_new), jnp.asarray(v_new),
                                                        cache, 0, meta.with_backend(backend))
    want, k_want, v_want = numpy_attention(q, k_new, v_new, cache.k[0], cache.v[0], meta)
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(new_cache.k[0]), k_want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_cache.v[0]), v_want, rtol=1e-6)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name, meta", list(cases()), ids=[c[0] for c in cases()])
def test_backend_computes_the_definition(backend, name, meta):
    _check_definition(backend, meta)


@pytest.mark.parametrize("block", [8, 24])
def test_blockwise_prefix_in_several_blocks(monkeypatch, block):
    """Prefixes of 17 and 40 slots over blocks of 8 (five trips) and of 24, which does not divide the
    64-slot buffer (the last block overlaps the one before it and the overlap is masked)."""
    import eagle3_jax.attention.blockwise as blockwise

    monkeypatch.setattr(blockwise, "PREFIX_BLOCK", block)
    lengths = jnp.asarray([0, 17, 40], jnp.int32)
    _check_definition("blockwise", AttentionMetadata.causal(lengths, 5))
    _check_definition("blockwise", AttentionMetadata.causal(jnp.asarray([0, 0, 3], jnp.int32), 1))


def test_pallas_gpu_runs_the_kernel_for_decode_and_verify():
    """On these shapes the GPU backend's prefix goes through the Pallas kernel (interpret mode on CPU),
    not the portable fallback; a prefill-sized forward falls back."""
    from eagle3_jax.attention.pallas_gpu import MAX_KERNEL_ROWS, kernel_tiling
    from eagle3_jax.kv_cache import aligned_capacity

    assert kernel_tiling(CAP) == (1, 64) and kernel_tiling(1024) == (16, 64) and kernel_tiling(40) is None
    for capacity in (256 + 8, 2048 + 8, 16384 + 8, 32768 + 8, 40000):  # what the decoders allocate tiles well
        splits, block_k = kernel_tiling(aligned_capacity(capacity))
        assert block_k >= 64 and (splits == 16 or capacity < 32768)
    assert aligned_capacity(32768 + 8) == 33792 and aligned_capacity(100) == 128 and aligned_capacity(2048) == 2048

    def traced(t):
        meta = AttentionMetadata.causal(jnp.asarray([0, 5, 17], jnp.int32), t, backend="pallas_gpu")
        q = jnp.zeros((B, t, HQ, D))
        kv = jnp.zeros((B, t, HKV, D))
        cache = KVCache.create(num_layers=1, batch=B, capacity=CAP, kv_heads=HKV, head_dim=D, dtype=jnp.float32)
        return str(jax.make_jaxpr(lambda *a: attend(*a, 0, meta))(q, kv, kv, cache))

    assert "pallas_call" in traced(1) and "pallas_call" in traced(8)
    assert "pallas_call" not in traced(MAX_KERNEL_ROWS // (HQ // HKV) + 1)


def test_pallas_tpu_runs_the_kernel_over_several_blocks(monkeypatch):
    """The TPU kernel (interpret mode here) over 128-slot blocks of a 512-slot cache: prefixes ending in
    the first, the second and the fourth block and an empty one, for a decode step, a verify forward
    and a draft beam step; a prefill-sized forward falls back to the block loop."""
    import eagle3_jax.attention.pallas_tpu as pallas_tpu

    monkeypatch.setattr(pallas_tpu, "BLOCK_K", 128)
    assert pallas_tpu.kernel_block(512) == 128 and pallas_tpu.kernel_block(40) is None
    lengths = jnp.asarray([0, 130, 500], jnp.int32)
    for meta in (AttentionMetadata.causal(lengths, 1), AttentionMetadata.causal(lengths, 6),
                 AttentionMetadata.window_of(lengths, lengths[:, None] + jnp.asarray([[2, 2, 2]]),
                                             jnp.asarray([[3, 4, 5]]), jnp.ones((B, 3, 9), bool))):
        _check_definition("pallas_tpu", meta, capacity=512)

    def traced(t):
        meta = AttentionMetadata.causal(lengths, t, backend="pallas_tpu")
        q, kv = jnp.zeros((B, t, HQ, D)), jnp.zeros((B, t, HKV, D))
        cache = KVCache.create(num_layers=1, batch=B, capacity=512, kv_heads=HKV, head_dim=D, dtype=jnp.float32)
        return str(jax.make_jaxpr(lambda *a: attend(*a, 0, meta))(q, kv, kv, cache))

    assert "pallas_call" in traced(1) and "pallas_call" in traced(8)
    assert "pallas_call" not in traced(pallas_tpu.MAX_KERNEL_ROWS // (HQ // HKV) + 1)


def test_pallas_gpu_kernel_over_sixteen_splits():
    """A 1024-slot cache: 16 splits of 64 slots, prefixes ending inside the first, the second and the
    eleventh split, for a decode step and a verify forward."""
    lengths = jnp.asarray([0, 70, 700], jnp.int32)
    _check_definition("pallas_gpu", AttentionMetadata.causal(lengths, 1), capacity=1024)
    _check_definition("pallas_gpu", AttentionMetadata.causal(lengths, 6), capacity=1024)


def test_auto_is_the_platform_default():
    from eagle3_jax.attention import PLATFORM_DEFAULTS, resolve_backend

    assert resolve_backend("auto") == PLATFORM_DEFAULTS.get(jax.default_backend(), "blockwise")
    assert resolve_backend("reference") == "reference"
    assert PLATFORM_DEFAULTS["gpu"] == "pallas_gpu"
    if jax.default_backend() == "cpu":
        assert resolve_backend("auto") == "blockwise"


def test_auto_follows_the_platform_compiled_for():
    from eagle3_jax.attention import resolve_backend
    from eagle3_jax.platform import compiling_for

    with compiling_for("gpu"):  # ahead of time for a GPU: its kernel, which this CPU cannot check
        assert resolve_backend("auto") == "pallas_gpu"
    with compiling_for("tpu"):
        assert resolve_backend("auto") == "pallas_tpu"


class _FakeGpu:
    platform = "gpu"
    device_kind = "Tesla T4"

    def __init__(self, capability):
        self.compute_capability = capability


@pytest.mark.parametrize("capability, backend", [("7.5", "blockwise"), ("8.0", "pallas_gpu"), ("9.0", "pallas_gpu")])
def test_auto_avoids_the_kernel_on_old_gpus(monkeypatch, capsys, capability, backend):
    """A GPU older than compute capability 8.0 (Colab's T4: 7.5) cannot compile the Pallas GPU kernel:
    'auto' falls back to 'blockwise' and says so once."""
    import eagle3_jax.attention as attention
    from eagle3_jax.platform import compiling_for

    monkeypatch.setattr(attention, "executes_here", lambda: True)
    monkeypatch.setattr(jax, "devices", lambda *a: [_FakeGpu(capability)])
    attention.pallas_gpu_supported.cache_clear()
    try:
        with compiling_for("gpu"):
            assert attention.resolve_backend("auto") == backend
            assert attention.resolve_backend("auto") == backend
            assert attention.resolve_backend("pallas_gpu") == "pallas_gpu"  # named: as asked
    finally:
        attention.pallas_gpu_supported.cache_clear()
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == (backend == "blockwise")
    if notes:
        assert "Tesla T4 (compute capability 7.5)" in notes[0] and "'blockwise'" in notes[0]


def test_dense_mask_is_prefix_plus_window():
    meta = AttentionMetadata.window_of(jnp.asarray([2]), jnp.asarray([[2, 3]]), jnp.asarray([[0, 1]]),
                                       jnp.asarray([[[True, False, True], [False, True, False]]]))
    np.testing.assert_array_equal(np.asarray(meta.dense_mask(6))[0].astype(int),
                                  [[1, 1, 1, 0, 1, 0], [1, 1, 0, 1, 0, 0]])


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_in_whole_forwards_matches_reference(backend):
    cfg = Qwen3Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e4)
    model = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), init_std=0.2)
    cache = KVCache.create(num_layers=2, batch=2, capacity=32, kv_heads=2, head_dim=8, dtype=jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 61, size=(2, 9)), jnp.int32)
    outs = {}
    for name in ("reference", backend):
        meta = AttentionMetadata.causal(jnp.zeros((2,), jnp.int32), 9, backend=name)
        out = model(tokens, cache, meta)
        step = model(tokens[:, :1], out.cache.with_lengths(jnp.full((2,), 9)),
                     AttentionMetadata.causal(jnp.full((2,), 9), 1, backend=name))
        outs[name] = (np.asarray(out.logits), np.asarray(step.logits))
    for a, b in zip(outs["reference"], outs[backend]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(InputError,
                       match="unknown attention backend 'flash'; choose one of auto, blockwise, pallas_gpu, "
                             "pallas_tpu, reference"):
        check_backend("flash")
    from eagle3_jax.decoding.common import DecodeSettings

    with pytest.raises(InputError, match="unknown attention backend"):
        DecodeSettings(max_new_tokens=4, capacity=16, attention="flash")


def test_generator_takes_the_backend_by_name():
    from eagle3_jax import Generator

    cfg = Qwen3Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e4)
    model = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), init_std=0.2)
    with pytest.raises(InputError, match="unknown attention backend 'flash'"):
        Generator(model, attention="flash")
    out = Generator(model, attention="reference").generate([[3, 4, 5]], max_new_tokens=4, stop_token_ids=())
    assert len(out[0].token_ids) == 4


@pytest.mark.parametrize("backend", ["blockwise", "pallas_gpu", "pallas_tpu"])
def test_gradients_match_the_reference(backend):
    """Reverse-mode derivatives through a live-length backend (its prefix loop and kernel take the
    dense prefix's VJP) equal those through the reference, for the queries, the new K/V and the cache."""
    rng = np.random.default_rng(3)
    meta = AttentionMetadata.causal(jnp.asarray([0, 5, 17], jnp.int32), 3)
    q = jnp.asarray(rng.normal(size=(B, 3, HQ, D)), jnp.float32)
    k_new, v_new = (jnp.asarray(rng.normal(size=(B, 3, HKV, D)), jnp.float32) for _ in range(2))
    buffers = tuple(jnp.asarray(rng.normal(size=(B, HKV, CAP, D)), jnp.float32) for _ in range(2))
    weight = jnp.asarray(rng.normal(size=(B, 3, HQ, D)), jnp.float32)

    def loss(name, q, k_new, v_new, buffers):
        cache = KVCache(k=(buffers[0],), v=(buffers[1],), lengths=meta.kv_lengths)
        out, _ = attend(q, k_new, v_new, cache, 0, meta.with_backend(name))
        return jnp.sum(out * weight)

    want = jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2, 3))(q, k_new, v_new, buffers)
    got = jax.grad(functools.partial(loss, backend), argnums=(0, 1, 2, 3))(q, k_new, v_new, buffers)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
