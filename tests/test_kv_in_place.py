"""The KV caches are read and written where they lie (docs/architecture.md#kv-cache).

The compiled plain and speculative loops are inspected, not timed: with the
platform's default attention backend, no instruction of the loop copies,
transposes or gathers a buffer with the cache's capacity (a layer's K or V
of the target, or the draft head's), and the loop's temporary memory stays
below one layer's buffer. A copy of a cache-sized buffer per step (what a
stacked cache's per-layer slice, a transposed V or a non-aliased update
costs) fails both.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from eagle3_jax import Eagle3Config, Eagle3DraftHead, Qwen3Config, Qwen3ForCausalLM
from eagle3_jax.attention import DEFAULT_BACKEND
from eagle3_jax.decoding import plain, speculative
from eagle3_jax.decoding.common import DecodeSettings, RuntimeParams
from eagle3_jax.decoding.tree import TreeSpec

CFG = Qwen3Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rope_theta=1e4)
CAPACITY = 4096  # far above everything else in the loop, so a cache-sized buffer stands out


def _compiled_loop(mode: str, spec: TreeSpec):
    tg, tw = nnx.split(Qwen3ForCausalLM(CFG, rngs=nnx.Rngs(0)))
    dg, dw = nnx.split(Eagle3DraftHead(Eagle3Config.for_target(CFG, draft_vocab_size=61), rngs=nnx.Rngs(1)))
    settings = DecodeSettings(max_new_tokens=64, capacity=CAPACITY)
    params = RuntimeParams.make()
    prompt = (jnp.ones((1, 8), jnp.int32), jnp.full((1,), 8, jnp.int32), jax.random.PRNGKey(0))
    if mode == "plain":
        state = jax.eval_shape(lambda w, *a: plain.start(nnx.merge(tg, w), *a, params, settings), tw, *prompt)
        loop = jax.jit(lambda w, s: plain.decode_loop(nnx.merge(tg, w), s, params, settings), donate_argnums=(1,))
        return loop.lower(tw, state).compile(), [state.cache]
    state = jax.eval_shape(lambda w, d, *a: speculative.start(nnx.merge(tg, w), nnx.merge(dg, d), *a, params,
                                                              settings, spec), tw, dw, *prompt)
    loop = jax.jit(lambda w, d, s: speculative.decode_loop(nnx.merge(tg, w), nnx.merge(dg, d), s, params, settings,
                                                           spec), donate_argnums=(2,))
    return loop.lower(tw, dw, state).compile(), [state.target_cache, state.draft_cache]


@pytest.mark.parametrize("mode, spec", [("plain", None), ("speculative", TreeSpec(3, 1, 4)),
                                        ("speculative", TreeSpec(3, 4, 8))], ids=["plain", "chain", "tree"])
def test_loop_updates_the_caches_in_place(mode, spec):
    compiled, caches = _compiled_loop(mode, spec)
    assert DEFAULT_BACKEND == "auto"
    capacities = {c.capacity for c in caches}
    text = compiled.as_text()
    copies = [line.strip()[:160] for line in text.splitlines()
              if re.search(r"= \w+\[([0-9,]*)\]\S* (copy|transpose|gather|slice)\(", line)
              and any(str(cap) in re.search(r"\[([0-9,]*)\]", line).group(1).split(",") for cap in capacities)]
    assert not copies, "cache-sized copies in the compiled loop:\n" + "\n".join(copies)
    layer_bytes = min(c.k[0].size * c.k[0].dtype.itemsize for c in caches)
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < layer_bytes, f"the loop's temporaries ({temp} bytes) hold a cache layer's buffer ({layer_bytes})"


def test_the_check_sees_a_copy():
    """The same inspection flags the reference backend, whose dots copy each layer's buffer."""
    tg, tw = nnx.split(Qwen3ForCausalLM(CFG, rngs=nnx.Rngs(0)))
    settings = DecodeSettings(max_new_tokens=64, capacity=CAPACITY, attention="reference")
    params = RuntimeParams.make()
    prompt = (jnp.ones((1, 8), jnp.int32), jnp.full((1,), 8, jnp.int32), jax.random.PRNGKey(0))
    state = jax.eval_shape(lambda w, *a: plain.start(nnx.merge(tg, w), *a, params, settings), tw, *prompt)
    compiled = jax.jit(lambda w, s: plain.decode_loop(nnx.merge(tg, w), s, params, settings),
                       donate_argnums=(1,)).lower(tw, state).compile()
    layer_bytes = state.cache.k[0].size * state.cache.k[0].dtype.itemsize
    assert compiled.memory_analysis().temp_size_in_bytes >= layer_bytes
