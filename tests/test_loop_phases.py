"""The speculative cycle as named phases (docs/architecture.md#the-loop): a profile of the
compiled step reads draft, verify, accept, commit, extend; ``start`` runs the same extend;
plain and speculative decoding share the loop driver and the result type."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eagle3_jax import Eagle3Config, Eagle3DraftHead, Qwen3Config, Qwen3ForCausalLM
from eagle3_jax.decoding import plain, speculative
from eagle3_jax.decoding.common import DecodeResult, DecodeSettings, RuntimeParams
from eagle3_jax.decoding.tree import TreeSpec

CFG = Qwen3Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rope_theta=1e4)
SETTINGS = DecodeSettings(max_new_tokens=8, capacity=32)
SPEC = TreeSpec(2, 2, 4)


def models():
    target = Qwen3ForCausalLM(CFG, rngs=nnx.Rngs(0), init_std=0.2)
    head = Eagle3DraftHead(Eagle3Config.for_target(CFG, feature_layers=(0, 1, 1)), rngs=nnx.Rngs(1))
    return target, head


def test_the_compiled_step_names_its_phases():
    target, head = models()
    tg, tw = nnx.split(target)
    dg, dw = nnx.split(head)

    def cycle(tw, dw, tokens, lengths):
        t, d = nnx.merge(tg, tw), nnx.merge(dg, dw)
        state = speculative.start(t, d, tokens, lengths, jax.random.key(0), RuntimeParams.make(), SETTINGS, SPEC)
        return speculative.step(t, d, state, RuntimeParams.make(), SETTINGS, SPEC).result.tokens

    text = jax.jit(cycle).lower(tw, dw, jnp.zeros((1, 16), jnp.int32), jnp.array([4])).as_text(debug_info=True)
    scopes = re.findall(r'"[^"]*?\b(draft|verify|accept|commit|extend)/', text)
    assert set(scopes) == {"draft", "verify", "accept", "commit", "extend"}


@pytest.mark.slow
def test_start_is_the_extend_over_the_prompt():
    """The root after ``start`` equals an explicit extend over the prompt from an empty draft cache."""
    target, head = models()
    prompt = jnp.asarray([[3, 9, 4, 11, 0, 0, 0, 0]], jnp.int32)
    lengths = jnp.asarray([4], jnp.int32)
    start = nnx.jit(speculative.start, static_argnums=(6, 7))  # compiled whole: op by op is slow
    state = start(target, head, prompt, lengths, jax.random.key(0), RuntimeParams.make(), SETTINGS, SPEC)
    features = target.forward_sequence(prompt, feature_layers=head.config.feature_layers(CFG)).features
    nxt = jnp.asarray([[9, 4, 11, int(state.root[0]), 0, 0, 0, 0]], jnp.int32)
    empty = state.draft_cache.with_lengths(jnp.zeros((1,), jnp.int32))
    root = nnx.jit(speculative.extend, static_argnums=(6, 7))(target, head, empty, nxt, features, lengths, SPEC,
                                                              SETTINGS)
    np.testing.assert_array_equal(np.asarray(root.children), np.asarray(state.root_children))
    np.testing.assert_allclose(np.asarray(root.logp), np.asarray(state.root_logp), rtol=1e-5, atol=1e-6)
    assert int(root.cache.lengths[0]) == 4


@pytest.mark.slow
def test_plain_and_speculative_return_one_result_type():
    target, head = models()
    tokens, lengths = jnp.asarray([[3, 9, 4, 11]], jnp.int32), jnp.asarray([4], jnp.int32)
    p = nnx.jit(plain.generate, static_argnums=(5,))(target, tokens, lengths, jax.random.key(0),
                                                     RuntimeParams.make(), SETTINGS)
    s = nnx.jit(speculative.generate, static_argnums=(6, 7))(target, head, tokens, lengths, jax.random.key(0),
                                                             RuntimeParams.make(), SETTINGS, SPEC).result
    assert type(p) is type(s) is DecodeResult
    np.testing.assert_array_equal(np.asarray(p.tokens), np.asarray(s.tokens))  # greedy: lossless
    forwards = int(p.num_forwards[0])
    assert np.asarray(p.accept_lengths)[0, :forwards].tolist() == [1] * forwards
    n = int(s.num_forwards[0])
    assert int(np.asarray(s.accept_lengths)[0, :n].sum()) == int(s.num_generated[0]) - 1
