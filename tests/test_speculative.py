"""Speculative decoding: the tree, losslessness (greedy and sampled), statistics, reuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats
from spec_helpers import fit_head, random_head, tiny_target

from eagle3_jax import Generator, InputError, SamplingParams
from eagle3_jax.attention import AttentionMetadata
from eagle3_jax.decoding import speculative
from eagle3_jax.decoding.common import DecodeSettings, RuntimeParams
from eagle3_jax.decoding.tree import TreeSpec, draft_tree
from eagle3_jax.kv_cache import causal_mask
from eagle3_jax.sampling import filter_logits

SPECS = [(3, 1, 4), (6, 1, 7), (4, 2, 6), (3, 4, 10)]


@pytest.fixture(scope="module")
def target():
    return tiny_target(0)


@pytest.fixture(scope="module")
def fitted(target):
    """A head fitted to the target's continuations of ``train_prompts``: it accepts long runs there."""
    head, _ = fit_head(target, num_seqs=24, steps=150)
    return head


@pytest.fixture(scope="module")
def random(target):
    return random_head(target, seed=3, draft_vocab=61)


@pytest.fixture(scope="module")
def train_prompts():
    rng = np.random.default_rng(0)  # the prompts fit_head(seed=0) trained on
    return [rng.integers(6, 97, size=6).tolist() for _ in range(24)]


@pytest.fixture(scope="module")
def pool(target, train_prompts):
    """Prompts of many lengths: memorised ones (long accepted runs), their prefixes, and fresh random ones."""
    conts = Generator(target).generate(train_prompts[:6], max_new_tokens=20, stop_token_ids=())
    seqs = [p + c.token_ids for p, c in zip(train_prompts, conts)]
    rng = np.random.default_rng(9)
    prompts = list(train_prompts[:6])
    prompts += [s[:n] for s, n in zip(seqs, (1, 2, 9, 13, 17, 24))]
    prompts += [rng.integers(6, 97, size=n).tolist() for n in (1, 4, 7, 12, 20)]
    return prompts


def plain(target, prompts, **kw):
    return Generator(target, max_cache_len=kw.pop("max_cache_len", None)).generate(prompts, **kw)


def spec(target, head, knobs, prompts, **kw):
    d, k, n = knobs
    gen = Generator(target, head, num_steps=d, topk=k, num_draft_tokens=n, max_cache_len=kw.pop("max_cache_len", None))
    return gen.generate(prompts, **kw)


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert x.finish_reason == y.finish_reason


# ------------------------------------------------------------------ the tree

def reference_tree(target, head, prompt, knobs):
    """SGLang's tree expansion written plainly: every node's draft logits come
    from running the draft as a chain over the node's own path (no tree masks)."""
    depth_max, k, n_tree = knobs
    settings = DecodeSettings(max_new_tokens=4, capacity=64, cache_dtype=jnp.dtype(jnp.float32))
    tokens = jnp.asarray([prompt + [0] * (16 - len(prompt))], jnp.int32)
    start = nnx.jit(speculative.start, static_argnums=(6, 7))  # compiled whole: op by op is slow
    state = start(target, head, tokens, jnp.asarray([len(prompt)], jnp.int32), jax.random.key(0),
                  RuntimeParams.make(), settings, TreeSpec(*knobs))
    n = int(state.draft_cache.lengths[0])

    def child_logp(path):
        """Draft log-probs after the root's children ``path`` (depth >= 1), run as a chain."""
        cache, g = state.draft_cache, state.root_hidden[:, None]
        for i, tok in enumerate(path):
            lengths = jnp.asarray([n + i])
            meta = AttentionMetadata.dense(jnp.asarray([[n + i]]), lengths[:, None],
                                           causal_mask(lengths, 1, cache.capacity))
            out = head(target.embed(jnp.asarray([[tok]])), g, cache, meta, hidden_is_features=False)
            cache, g = out.cache.with_lengths(lengths + 1), out.hidden
        return np.asarray(jax.nn.log_softmax(out.logits[0, 0]))

    def top(logp):
        order = np.argsort(-logp, kind="stable")[:k]
        return [(int(head.to_target_ids(jnp.asarray(i))), float(logp[i])) for i in order]

    cands = [((int(t),), float(lp)) for t, lp in zip(np.asarray(state.root_children[0]),
                                                      np.asarray(state.root_logp[0]))]
    beam = list(cands)
    for _ in range(2, depth_max + 1):
        new = [(path + (tok,), score + lp) for path, score in beam for tok, lp in top(child_logp(list(path)))]
        cands += new
        beam = sorted(new, key=lambda c: -c[1])[:k]
    chosen = sorted(range(len(cands)), key=lambda i: (-cands[i][1], i))[: n_tree - 1]
    return {cands[i][0] for i in chosen}, state


@pytest.mark.parametrize("knobs", [(3, 2, 6), (4, 3, 9), (2, 4, 12)])
@pytest.mark.slow
def test_tree_matches_a_plain_reference_expansion(target, fitted, train_prompts, knobs):
    expected, state = reference_tree(target, fitted, train_prompts[1][:5], knobs)
    spec_ = TreeSpec(*knobs)
    tree, _ = draft_tree(fitted, target.embed, state.draft_cache, state.root, state.root_children,
                         state.root_logp, state.root_hidden, jnp.array([True]), spec_)
    tokens, parents, depths = (np.asarray(x[0]) for x in (tree.tokens, tree.parents, tree.depths))
    anc = np.asarray(tree.ancestors[0])
    paths = set()
    for i in range(1, spec_.num_draft_tokens):
        assert parents[i] < i and depths[i] == depths[parents[i]] + 1  # parents first, depth consistent
        path, j = [], i
        while j != 0:
            assert anc[i, j]
            path.insert(0, int(tokens[j]))
            j = parents[j]
        assert anc[i].sum() == depths[i] + 1  # exactly its ancestors, the root and itself
        paths.add(tuple(path))
    assert depths[0] == 0 and tokens[0] == int(state.root[0])
    assert paths == expected


@pytest.mark.parametrize("knobs, message", [
    ((3, 1, 5), "num_draft_tokens must be num_steps + 1 = 4"),
    ((2, 2, 8), "exceeds what num_steps=2, topk=2 can draft: at most 7"),
    ((3, 2, 1), "at least 2"),
    ((0, 2, 4), "num_steps must be a positive integer"),
])
def test_tree_spec_errors(knobs, message):
    with pytest.raises(InputError) as e:
        TreeSpec(*knobs)
    assert message in str(e.value)


# ------------------------------------------------------------- greedy, lossless

# The quick loop (-m "not slow") keeps one case: the random head (no fitting) on a branching tree (topk 2).
@pytest.mark.parametrize("knobs", [k if k == (4, 2, 6) else pytest.param(k, marks=pytest.mark.slow) for k in SPECS])
@pytest.mark.parametrize("head_name", [pytest.param("fitted", marks=pytest.mark.slow), "random"])
def test_greedy_equals_plain(target, pool, knobs, head_name, request):
    head = request.getfixturevalue(head_name)
    prompts = pool[:4] + pool[-3:]
    ref = plain(target, prompts, max_new_tokens=30, stop_token_ids=())
    outs = spec(target, head, knobs, prompts, max_new_tokens=30, stop_token_ids=())
    assert_same(ref, outs)
    tau = np.mean([o.acceptance_length for o in outs[:4]])
    if head_name == "fitted":
        assert tau > 2.0, tau  # long accepted runs were exercised
    for o in outs:
        assert all(1 <= a <= knobs[0] + 1 for a in o.accept_lengths)
        assert sum(o.accept_lengths) == len(o.token_ids) - 1 == 29
        assert o.num_target_forwards == len(o.accept_lengths)
        assert o.acceptance_length == pytest.approx(29 / o.num_target_forwards)


# 12 drawn cases (each compiles its own shapes, about 5-10 s on 2 cores): what the CI budget of 30 minutes allows
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
@pytest.mark.slow
def test_greedy_equals_plain_hypothesis(target, fitted, random, pool, data):
    """Random batches, shapes, caches that fill mid-step, and stop tokens inside accepted runs."""
    batch = data.draw(st.sampled_from([1, 3]))
    prompts = data.draw(st.lists(st.sampled_from(pool), min_size=batch, max_size=batch))
    knobs = data.draw(st.sampled_from(SPECS))
    head = data.draw(st.sampled_from([fitted, fitted, random]))
    max_new = data.draw(st.sampled_from([9, 30]))
    cache = data.draw(st.sampled_from([None, 40]))
    free = plain(target, prompts, max_new_tokens=max_new, stop_token_ids=(), max_cache_len=cache)
    seen = sorted({t for o in free for t in o.token_ids})
    stops = data.draw(st.sampled_from([(), tuple(seen[:1]), tuple(seen[-2:])]))
    ref = plain(target, prompts, max_new_tokens=max_new, stop_token_ids=stops, max_cache_len=cache)
    outs = spec(target, head, knobs, prompts, max_new_tokens=max_new, stop_token_ids=stops, max_cache_len=cache)
    assert_same(ref, outs)
    for p, o in zip(prompts, outs):
        assert sum(o.accept_lengths) == len(o.token_ids) - 1
        if cache is not None:
            assert len(p) + len(o.token_ids) <= cache


@pytest.mark.slow
def test_cache_fills_in_the_middle_of_an_accepted_run(target, fitted, train_prompts):
    prompts = train_prompts[:3]
    ref = plain(target, prompts, max_new_tokens=50, stop_token_ids=(), max_cache_len=19)
    outs = spec(target, fitted, (6, 1, 7), prompts, max_new_tokens=50, stop_token_ids=(), max_cache_len=19)
    assert_same(ref, outs)
    for o in outs:
        assert len(o.token_ids) == 19 - 6 and o.finish_reason == "length"
        assert max(o.accept_lengths) > 1
    # the last step was cut by the cache: fewer tokens than accepted
    assert any(o.accept_lengths[-1] < max(o.accept_lengths) for o in outs)


@pytest.mark.slow
def test_stop_token_inside_an_accepted_run(target, fitted, train_prompts):
    prompts = train_prompts[:2]
    free = plain(target, prompts, max_new_tokens=25, stop_token_ids=())
    stop = free[0].token_ids[8]
    ref = plain(target, prompts, max_new_tokens=25, stop_token_ids=[stop])
    outs = spec(target, fitted, (6, 1, 7), prompts, max_new_tokens=25, stop_token_ids=[stop])
    assert_same(ref, outs)
    first = outs[0]
    assert first.finish_reason == "eos" and first.token_ids[-1] == stop
    assert len(first.token_ids) == free[0].token_ids.index(stop) + 1


@pytest.mark.slow
def test_finished_rows_stop_advancing(target, fitted, train_prompts):
    """Rows that finish early stay put while others run on, and never write past their cache."""
    prompts = train_prompts[:3]
    free = plain(target, prompts, max_new_tokens=30, stop_token_ids=())
    stop = free[1].token_ids[3]
    knobs = TreeSpec(5, 2, 8)
    settings = DecodeSettings(max_new_tokens=30, capacity=64, cache_dtype=jnp.dtype(jnp.float32))
    tokens = np.zeros((3, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :6] = p
    generate = nnx.jit(speculative.generate, static_argnums=(6, 7))  # one program, not op by op
    final = generate(target, fitted, jnp.asarray(tokens), jnp.full((3,), 6, jnp.int32),
                     jax.random.key(0), RuntimeParams.make(stop_ids=[stop]), settings, knobs)
    result = final.result
    n = np.asarray(result.num_generated)
    lengths = np.asarray(final.target_cache.lengths)
    assert n[1] == free[1].token_ids.index(stop) + 1 and n[1] < n[0]
    assert (np.asarray(result.tokens[1, n[1]:]) == -1).all()
    # committed K/V: the prompt and the emitted tokens but the newest (never more than one step's overshoot)
    assert ((lengths >= 6 + n - 1) & (lengths <= 6 + n - 1 + knobs.num_steps)).all()
    assert (np.asarray(final.draft_cache.lengths) == lengths).all()
    assert int(np.asarray(result.num_forwards[1])) < int(np.asarray(result.num_forwards[0]))


# ---------------------------------------------------------------- sampling

def exact_joint(target, prompt, sampling, depth=3):
    """P(t1..t_depth) under the target's processed sampling distribution, by enumeration."""
    vocab = target.config.vocab_size
    seqs = [[]]
    probs = np.ones(1)
    for _ in range(depth):
        batch = np.array([prompt + s for s in seqs], np.int32)
        b, t = batch.shape
        cache = speculative.KVCache.create(num_layers=target.config.num_hidden_layers, batch=b, capacity=t,
                                           kv_heads=2, head_dim=12, dtype=jnp.float32)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        meta = AttentionMetadata.dense(pos, pos, causal_mask(jnp.zeros(b, jnp.int32), t, t))
        out = target(jnp.asarray(batch), cache, meta,
                     logits_indices=jnp.full((b, 1), t - 1, jnp.int32))
        p = np.asarray(jax.nn.softmax(filter_logits(out.logits[:, 0], jnp.float32(sampling.temperature),
                                                     jnp.float32(sampling.top_p), sampling.top_k), axis=-1),
                       np.float64)
        probs = (probs[:, None] * p).reshape(-1)
        seqs = [s + [v] for s in seqs for v in range(vocab)]
    return probs / probs.sum()


def chi_square_p(counts, expected_probs):
    n = counts.sum()
    expected = expected_probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=1.0),
                                      SamplingParams(temperature=0.7, top_k=5, top_p=0.9)])
@pytest.mark.slow
def test_speculative_sampling_has_the_target_distribution(sampling):
    """First three tokens of thousands of rows: plain and speculative sampling both fit the exact joint law."""
    target = tiny_target(4, vocab=8, init_std=0.4)
    head = random_head(target, seed=5, draft_vocab=6)
    prompt = [1, 2, 3]
    exact = exact_joint(target, prompt, sampling)
    rows = 4000
    for gen in (Generator(target), Generator(target, head, num_steps=3, topk=2, num_draft_tokens=6)):
        outs = gen.generate([prompt] * rows, max_new_tokens=3, sampling=sampling, seed=11, stop_token_ids=())
        codes = np.array([o.token_ids[0] * 64 + o.token_ids[1] * 8 + o.token_ids[2] for o in outs])
        counts = np.bincount(codes, minlength=512).astype(np.float64)
        assert chi_square_p(counts, exact) > 1e-3
        if gen.speculative:
            taus = np.array([o.acceptance_length for o in outs])
            assert taus.mean() > 1.2  # drafts were accepted, and rejected, often


@pytest.mark.slow
def test_sampling_control_detects_a_wrong_distribution():
    """The chi-square check has power: samples at another temperature fail it."""
    target = tiny_target(4, vocab=8, init_std=0.4)
    exact = exact_joint(target, [1, 2, 3], SamplingParams(temperature=1.0))
    outs = Generator(target).generate([[1, 2, 3]] * 4000, max_new_tokens=3, sampling=SamplingParams(temperature=1.6),
                                      seed=11, stop_token_ids=())
    codes = np.array([o.token_ids[0] * 64 + o.token_ids[1] * 8 + o.token_ids[2] for o in outs])
    assert chi_square_p(np.bincount(codes, minlength=512).astype(np.float64), exact) < 1e-6


@pytest.mark.slow
def test_sampled_generation_is_seeded(target, fitted, train_prompts):
    s = SamplingParams(temperature=0.8, top_p=0.95)
    a = spec(target, fitted, (4, 2, 6), train_prompts[:2], max_new_tokens=15, sampling=s, seed=3, stop_token_ids=())
    b = spec(target, fitted, (4, 2, 6), train_prompts[:2], max_new_tokens=15, sampling=s, seed=3, stop_token_ids=())
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


# ------------------------------------------------------------- API behaviour

@pytest.mark.slow
def test_compiled_loop_is_reused(target, fitted, pool):
    gen = Generator(target, fitted, num_steps=4, topk=2, num_draft_tokens=6)
    gen.generate([pool[0], pool[12]], max_new_tokens=12)
    before = gen.num_compiles
    outs = gen.generate([pool[13], pool[3]], max_new_tokens=12, stop_token_ids=[7, 9, 11])
    assert gen.num_compiles == before and outs[0].compile_seconds == 0.0
    # Sampling (its temperature, top-p and top-k) and max_new_tokens are runtime values of the same programs.
    for kwargs in (dict(max_new_tokens=30, temperature=0.8, top_k=4, seed=2), dict(max_new_tokens=5, top_p=0.9,
                                                                                   temperature=1.0), {}):
        outs = gen.generate([pool[1], pool[2]], **{"max_new_tokens": 12, **kwargs})
        assert outs[0].compile_seconds == 0.0 and len(outs[0].token_ids) <= kwargs.get("max_new_tokens", 12)
    assert gen.num_compiles == before


@pytest.mark.slow
def test_runs_under_an_outer_jit(target, fitted, train_prompts):
    knobs = TreeSpec(4, 2, 6)
    settings = DecodeSettings(max_new_tokens=12, capacity=64, cache_dtype=jnp.dtype(jnp.float32))
    tg, tw = nnx.split(target)
    dg, dw = nnx.split(fitted)

    @jax.jit
    def run(tw, dw, tokens, lengths):
        state = speculative.generate(nnx.merge(tg, tw), nnx.merge(dg, dw), tokens, lengths, jax.random.key(0),
                                     RuntimeParams.make(stop_ids=()), settings, knobs)
        return state.result

    tokens = np.zeros((2, 16), np.int32)
    tokens[:, :6] = train_prompts[:2]
    result = run(tw, dw, jnp.asarray(tokens), jnp.full((2,), 6, jnp.int32))
    expected = spec(target, fitted, (4, 2, 6), train_prompts[:2], max_new_tokens=12, stop_token_ids=())
    for i in range(2):
        assert np.asarray(result.tokens[i]).tolist() == expected[i].token_ids


@pytest.mark.slow
def test_streaming_yields_the_same_tokens(target, fitted, pool):
    prompts = [pool[0], pool[14]]
    got = {0: [], 1: []}
    outs = spec(target, fitted, (4, 2, 6), prompts, max_new_tokens=25, stop_token_ids=(),
                stream=lambda row, toks: got[row].extend(toks), stream_every=2)
    ref = spec(target, fitted, (4, 2, 6), prompts, max_new_tokens=25, stop_token_ids=())
    assert_same(ref, outs)
    assert [got[0], got[1]] == [o.token_ids for o in outs]


@pytest.mark.slow
def test_plain_reports_acceptance_one(target, pool):
    out = plain(target, [pool[0]], max_new_tokens=10, stop_token_ids=())[0]
    assert out.acceptance_length == 1.0 and out.accept_lengths == [1] * 9


@pytest.mark.slow
def test_knob_errors(target, fitted, random):
    with pytest.raises(InputError, match="need a draft head"):
        Generator(target, num_steps=3)
    with pytest.raises(InputError, match="num_draft_tokens is required when topk > 1"):
        Generator(target, fitted, num_steps=3, topk=2)
    other = tiny_target(0, vocab=50)
    with pytest.raises(Exception, match="vocab_size 97 differs from the target's 50"):
        Generator(other, random)
