"""EAGLE-3 speculative decoding as pure, jittable functions (docs/architecture.md#the-loop).

One cycle of the ``lax.while_loop``:

    draft:   a fixed-shape tree of N tokens from the draft head (tree.py)
    verify:  ONE target forward over the N tree tokens at positions n + depth,
             K/V written provisionally at slots n .. n+N-1, tree attention
    accept:  greedy or lossless sampling (verify.py) -> path, bonus token
    commit:  the path's K/V gathered into slots n .. n+L-1; the draft extends
             over the accepted tokens with their target features

Rejected branches leave no trace: their target K/V sit past the committed
length and are overwritten by the next cycle, and the draft's tree K/V are
overwritten by the extend. Both caches are allocated with headroom past the
user's capacity so that provisional writes always fit.

Non-finite logits (NaN / inf: broken weights or a numeric blow-up) finish a
row with 'nonfinite', keeping the tokens committed before. The rule, per row
and cycle: if ANY of the target's logits over the verified tree, or any draft
logit the tree was built from (``Tree.draft_finite``), is not finite, the
cycle commits nothing and the row finishes. Every tree node is a real token
in a real context, so a sound model never gives a non-finite logit anywhere
in the tree; and non-finite draft logits can corrupt the tree's structure
(even greedy output), so the draft is held to the same rule. The prefill's
logits are checked as in plain decoding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from eagle3_jax.decoding.common import DecodeResult, DecodeSettings, RuntimeParams, nonfinite_rows, prefill
from eagle3_jax.decoding.tree import TreeSpec, draft_tree, root_candidates, tree_attention_mask
from eagle3_jax.decoding.verify import accept_greedy, accept_sampling
from eagle3_jax.kv_cache import KVCache, causal_mask
from eagle3_jax.models.eagle3 import Eagle3DraftHead
from eagle3_jax.models.qwen3 import Qwen3ForCausalLM
from eagle3_jax.sampling import select_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecLoopState:
    """Carry of the speculative loop.

    Attributes:
      target_cache, draft_cache: KV caches; both have lengths n (committed).
      root: [batch] int32 the newest emitted token x_n (not in either cache yet).
      root_children, root_logp: [batch, K] the draft's top-K continuations of
        the root (target ids) and their log-probs.
      root_hidden: [batch, hidden] the draft's ``g`` at position n-1.
      result: tokens and counters.
      accept_lengths: [batch, max_new_tokens] int32 tokens appended at each
        verify step (bonus included); 0 past ``result.num_forwards``.
      rng: PRNG key.
      iterations: int32 loop iterations run so far (for chunked streaming).
    """

    target_cache: KVCache
    draft_cache: KVCache
    root: jax.Array
    root_children: jax.Array
    root_logp: jax.Array
    root_hidden: jax.Array
    result: DecodeResult
    accept_lengths: jax.Array
    rng: jax.Array
    iterations: jax.Array


def cache_headroom(spec: TreeSpec) -> int:
    """Slots beyond the user-visible capacity, so provisional tree writes always fit."""
    return spec.num_draft_tokens + spec.draft_slots


def embedder(target: Qwen3ForCausalLM, draft: Eagle3DraftHead):
    """Token ids -> embeddings for the draft: its own table if it kept one, else the target's."""
    if draft.embed_tokens is not None:
        return draft.embed_tokens
    return target.embed


def start(target: Qwen3ForCausalLM, draft: Eagle3DraftHead, tokens: jax.Array, prompt_lengths: jax.Array,
          rng: jax.Array, params: RuntimeParams, settings: DecodeSettings, spec: TreeSpec) -> SpecLoopState:
    """Prefills the target (with features), picks the first token, and extends the draft over the prompt.

    Args:
      tokens: [batch, bucket] int32 right-padded prompts; prompt_lengths: [batch].
    """
    layers = draft.config.feature_layers(target.config)
    headroom = cache_headroom(spec)
    alloc = dataclasses.replace(settings, capacity=settings.capacity + headroom)
    logits, target_cache, features = prefill(target, tokens, prompt_lengths, alloc, layers)
    rng, sub = jax.random.split(rng)
    first = select_tokens(logits, sub, params.temperature, params.top_p, greedy=settings.greedy, top_k=settings.top_k)

    batch, bucket = tokens.shape
    cfg = draft.config
    draft_cache = KVCache.create(num_layers=1, batch=batch, capacity=alloc.capacity, kv_heads=cfg.num_key_value_heads,
                                 head_dim=cfg.head_dim, dtype=settings.cache_dtype)
    # Draft input at position t pairs the target feature f_t with token x_{t+1}; x_P is the first new token.
    idx = jnp.arange(bucket, dtype=jnp.int32)[None, :]
    shifted = jnp.concatenate([tokens[:, 1:], jnp.zeros((batch, 1), tokens.dtype)], axis=1)
    shifted = jnp.where(idx == (prompt_lengths - 1)[:, None], first[:, None], shifted)
    positions = jnp.broadcast_to(idx, (batch, bucket))
    last = (prompt_lengths - 1)[:, None]
    out = draft(embedder(target, draft)(shifted), features, positions, draft_cache, positions,
                causal_mask(jnp.zeros((batch,), jnp.int32), bucket, alloc.capacity), hidden_is_features=True,
                logits_indices=last)
    children, logp = root_candidates(out.logits[:, 0], draft, spec.topk)
    result = DecodeResult.start(first, settings, prompt_lengths, params.stop_ids, nonfinite=nonfinite_rows(logits))
    return SpecLoopState(
        target_cache=target_cache, draft_cache=out.cache.with_lengths(prompt_lengths), root=first,
        root_children=children, root_logp=logp,
        root_hidden=jnp.take_along_axis(out.hidden, last[:, :, None], axis=1)[:, 0],
        result=result, accept_lengths=jnp.zeros((batch, settings.max_new_tokens), jnp.int32), rng=rng,
        iterations=jnp.zeros((), jnp.int32))


def step(target: Qwen3ForCausalLM, draft: Eagle3DraftHead, state: SpecLoopState, params: RuntimeParams,
         settings: DecodeSettings, spec: TreeSpec) -> SpecLoopState:
    """One draft-verify-accept-commit cycle for every unfinished row.

    A row whose tree logits (target) or drafting logits are not finite
    commits nothing and finishes with 'nonfinite' (see the module docstring).
    """
    depth_max = spec.num_steps
    active = state.result.finish_reason == 0
    tcache, dcache = state.target_cache, state.draft_cache
    n = tcache.lengths
    embed = embedder(target, draft)

    tree, dcache = draft_tree(draft, embed, dcache, state.root, state.root_children, state.root_logp,
                              state.root_hidden, active, spec)

    n_tree = spec.num_draft_tokens
    slots = jnp.where(active[:, None], n[:, None] + jnp.arange(n_tree, dtype=jnp.int32)[None, :], tcache.capacity)
    out = target(tree.tokens, n[:, None] + tree.depths, tcache, slots, tree_attention_mask(tree, n, tcache.capacity),
                 feature_layers=draft.config.feature_layers(target.config))
    rng, sub = jax.random.split(state.rng)
    if settings.greedy:
        acc = accept_greedy(tree, out.logits, depth_max)
    else:
        acc = accept_sampling(tree, out.logits, sub, params.temperature, params.top_p, top_k=settings.top_k,
                              depth_max=depth_max)
    nonfinite = active & (~tree.draft_finite | nonfinite_rows(out.logits))
    length = jnp.where(active & ~nonfinite, acc.length, 0)

    # Commit the target: gather the path's K/V into contiguous slots n .. n+L-1.
    j = jnp.arange(depth_max + 1, dtype=jnp.int32)[None, :]
    dst = jnp.where(j < length[:, None], n[:, None] + j, tcache.capacity)
    tcache = out.cache.gather_slots(n[:, None] + acc.path, dst).with_lengths(n + length)

    # Extend the draft over the accepted tokens: (f at path node j, the token after it).
    emitted = acc.emitted(tree)  # [batch, D+1]
    feats = jnp.take_along_axis(out.features, acc.path[:, :, None], axis=1)
    ext_slots = jnp.where(j < length[:, None], n[:, None] + j, dcache.capacity)
    last = jnp.maximum(length - 1, 0)[:, None]
    ext = draft(embed(emitted), feats, n[:, None] + j, dcache, ext_slots, causal_mask(n, depth_max + 1,
                                                                                       dcache.capacity),
                hidden_is_features=True, logits_indices=last)
    children, logp = root_candidates(ext.logits[:, 0], draft, spec.topk)
    hidden = jnp.take_along_axis(ext.hidden, last[:, :, None], axis=1)[:, 0]
    new_root = jnp.take_along_axis(emitted, last, axis=1)[:, 0]

    before = state.result.num_generated
    result = state.result.append(emitted, length, settings, params.stop_ids, forwards=active.astype(jnp.int32),
                                 nonfinite=nonfinite)
    step_index = jnp.where(active, state.result.num_forwards, settings.max_new_tokens)
    accept_lengths = state.accept_lengths.at[jnp.arange(n.shape[0]), step_index].set(
        result.num_generated - before, mode="drop")

    keep = active[:, None]
    return SpecLoopState(
        target_cache=tcache, draft_cache=ext.cache.with_lengths(n + length),
        root=jnp.where(active, new_root, state.root),
        root_children=jnp.where(keep, children, state.root_children),
        root_logp=jnp.where(keep, logp, state.root_logp),
        root_hidden=jnp.where(keep, hidden, state.root_hidden),
        result=result, accept_lengths=accept_lengths, rng=rng, iterations=state.iterations + 1)


def decode_loop(target: Qwen3ForCausalLM, draft: Eagle3DraftHead, state: SpecLoopState, params: RuntimeParams,
                settings: DecodeSettings, spec: TreeSpec, max_iterations: jax.Array | None = None) -> SpecLoopState:
    """Runs :func:`step` until every row is done (or ``max_iterations`` more cycles ran, for streaming)."""
    stop_at = state.iterations + (jnp.iinfo(jnp.int32).max // 2 if max_iterations is None else max_iterations)

    def cond(s):
        return jnp.any(s.result.finish_reason == 0) & (s.iterations < stop_at)

    return jax.lax.while_loop(cond, lambda s: step(target, draft, s, params, settings, spec), state)


def generate(target: Qwen3ForCausalLM, draft: Eagle3DraftHead, tokens: jax.Array, prompt_lengths: jax.Array,
             rng: jax.Array, params: RuntimeParams, settings: DecodeSettings, spec: TreeSpec) -> SpecLoopState:
    """The whole speculative generation as one pure function (usable under an outer ``jax.jit``)."""
    state = start(target, draft, tokens, prompt_lengths, rng, params, settings, spec)
    return decode_loop(target, draft, state, params, settings, spec)
