"""Non-finite logits (NaN / inf weights, a numeric blow-up) finish a row as 'nonfinite', never as a normal stop.

Weights are poisoned after loading (a load-time finiteness check may reject
them in the file). Every run uses one batch shape (2 rows, 12 new tokens,
one prompt bucket), so each decoding mode compiles once for the whole file.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from spec_helpers import random_head

from eagle3_jax import Generator, SamplingParams, load_target
from eagle3_jax.decoding.common import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_NONFINITE,
    RUNNING,
    DecodeResult,
    DecodeSettings,
    RuntimeParams,
    finish_reasons,
)

NEW = 12
KNOBS = dict(num_steps=3, topk=2, num_draft_tokens=6)
MODES = ["plain-greedy"] + [pytest.param(m, marks=pytest.mark.slow)  # the quick loop (-m "not slow") runs one mode
                            for m in ("plain-sampled", "spec-greedy", "spec-sampled")]
PROMPTS = [[11, 23, 42, 8, 61], [17, 30, 9, 77, 50, 64, 12]]


@pytest.fixture(scope="module")
def load(hf_qwen3):
    return lambda: load_target(hf_qwen3.path, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def draft(load):
    """A head whose 61-token draft vocabulary leaves out the other 36 ids: those are never drafted."""
    return random_head(load(), seed=3, draft_vocab=61)


def undraftable(draft):
    return [t for t in range(6, 97) if not bool(draft.t2d.value[t])]


def run(target, mode, draft, prompts=PROMPTS, **kw):
    gen = Generator(target, draft, **KNOBS) if mode.startswith("spec") else Generator(target)
    sampling = SamplingParams(temperature=1.0) if mode.endswith("sampled") else None
    return gen.generate(prompts, max_new_tokens=NEW, sampling=sampling, seed=7, stop_token_ids=(), **kw)


def poison_embedding(target, token, value):
    table = target.model.embed_tokens.embedding
    table.value = table.value.at[token].set(value)
    return target


def expected(prompt, clean, token):
    """What a row gives once ``token``'s embedding is non-finite: nothing if the prompt has it, else the clean
    tokens through its first occurrence (it comes from finite logits), then 'nonfinite'."""
    if token in prompt:
        return [], "nonfinite"
    if token in clean.token_ids[:-1]:
        return clean.token_ids[: clean.token_ids.index(token) + 1], "nonfinite"
    return clean.token_ids, clean.finish_reason  # never fed to the model (or last, as in plain decoding)


@pytest.mark.parametrize("mode", MODES)
def test_nan_weight_finishes_every_row_at_prefill(load, draft, mode):
    target = load()
    kernel = target.model.layers[1].mlp.down_proj.kernel
    kernel.value = kernel.value.at[3, 5].set(jnp.nan)
    streamed = []
    kw = dict(stream=lambda row, toks: streamed.append((row, toks))) if mode == "plain-greedy" else {}
    for out in run(target, mode, draft, **kw):
        assert out.finish_reason == "nonfinite"
        assert out.token_ids == [] and out.num_target_forwards == 0 and out.accept_lengths == []
    assert streamed == []


def test_inf_final_norm(load, draft):
    target = load()
    target.model.norm.weight.value = target.model.norm.weight.value.at[0].set(jnp.inf)
    assert [o.finish_reason for o in run(target, "plain-greedy", draft)] == ["nonfinite"] * 2


@pytest.mark.parametrize("mode", MODES)
def test_poisoned_prompt_token_stops_only_its_row(load, draft, mode):
    """A NaN embedding row of a token only row 0's prompt has: row 0 stops at prefill, row 1 is untouched."""
    clean = run(load(), mode, draft)
    token = next(t for t in undraftable(draft) if t not in PROMPTS[1] and t not in clean[1].token_ids)
    prompts = [PROMPTS[0][:-1] + [token], PROMPTS[1]]
    outs = run(poison_embedding(load(), token, jnp.nan), mode, draft, prompts)
    assert (outs[0].token_ids, outs[0].finish_reason) == ([], "nonfinite")
    ref = clean[1]
    assert (outs[1].token_ids, outs[1].finish_reason, outs[1].accept_lengths) == (
        ref.token_ids, ref.finish_reason, ref.accept_lengths)


@pytest.mark.parametrize("mode", MODES)
def test_inf_that_appears_later(load, draft, mode):
    """An inf embedding row of a token row 0 generates a few steps in: the row keeps the tokens through it (chosen
    from finite logits) and stops when it is fed back. The token is never drafted, so speculative decoding gives
    exactly what plain decoding gives."""
    clean = run(load(), mode, draft)
    seen = set(PROMPTS[0])
    token = None
    for i, t in enumerate(clean[0].token_ids[:-1]):
        if i >= 2 and t not in seen and t in undraftable(draft):
            token = t
            break
        seen.add(t)
    if token is None:
        pytest.skip("the clean continuation has no suitable token")  # deterministic; not expected
    outs = run(poison_embedding(load(), token, jnp.inf), mode, draft)
    assert outs[0].finish_reason == "nonfinite" and len(outs[0].token_ids) >= 3
    for prompt, ref, out in zip(PROMPTS, clean, outs):
        assert (out.token_ids, out.finish_reason) == expected(prompt, ref, token)
    if mode.startswith("plain"):
        assert outs[0].num_target_forwards == len(outs[0].token_ids) - 1  # the failing forward is not counted


@pytest.mark.parametrize("mode", ["spec-greedy", "spec-sampled"])
@pytest.mark.slow
def test_nan_draft_head(load, mode):
    """A finite target with a NaN draft head: the first token (from the target's prefill) stays, then the row
    stops rather than drafting from NaN scores."""
    target = load()
    head = random_head(target, seed=3, draft_vocab=61)
    head.lm_head.kernel.value = head.lm_head.kernel.value.at[0, 0].set(jnp.nan)
    plain = run(target, mode.replace("spec", "plain"), None)
    for ref, out in zip(plain, run(target, mode, head)):
        assert out.finish_reason == "nonfinite" and out.num_target_forwards == 0
        assert out.token_ids == ref.token_ids[:1]


def test_append_flags_only_running_rows():
    settings = DecodeSettings(max_new_tokens=4, capacity=64)
    stops = RuntimeParams.make(stop_ids=[5])
    result = DecodeResult.start(jnp.array([7, 5, 7, 7]), settings, jnp.array([3, 3, 3, 3]), stops,
                                nonfinite=jnp.array([False, False, True, False]))
    assert finish_reasons(result.finish_reason) == [None, "eos", "nonfinite", None]
    out = result.append(jnp.array([[8, 9]] * 4), jnp.array([2, 2, 2, 2]), settings, stops,
                        forwards=jnp.ones(4, jnp.int32), nonfinite=jnp.array([True, True, True, False]))
    assert np.asarray(out.finish_reason).tolist() == [FINISH_NONFINITE, FINISH_EOS, FINISH_NONFINITE, RUNNING]
    assert np.asarray(out.num_generated).tolist() == [1, 1, 0, 3]
    assert np.asarray(out.num_forwards).tolist() == [0, 0, 0, 1]
    assert np.asarray(out.tokens[:, :3]).tolist() == [[7, -1, -1], [5, -1, -1], [-1, -1, -1], [7, 8, 9]]
    assert FINISH_LENGTH != FINISH_NONFINITE
