"""EAGLE-3 speculative decoding as pure, jittable functions (docs/architecture.md#the-loop).

One cycle of the ``lax.while_loop`` (:func:`step`) runs five phases, each a
function under a ``jax.named_scope`` of its name, so a profile reads like
this list:

    draft:   a fixed-shape tree of N tokens from the draft head (tree.py)
    verify:  ONE target forward over the N tree tokens at positions n + depth,
             K/V written provisionally at slots n .. n+N-1, tree attention
    accept:  greedy or lossless sampling (verify.py) -> path, bonus token
    commit:  the path's K/V gathered into slots n .. n+L-1, the tokens
             appended to the result (stop rules)
    extend:  the draft runs over the accepted tokens with their target
             features, giving the next root's children

:func:`start` prefills the target and runs the same *extend* over the prompt.
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

from eagle3_jax.attention import AttentionMetadata
from eagle3_jax.axes import DRAFT_KV_CACHE_AXES, ROWS, SHARED, axes_field
from eagle3_jax.decoding.common import DecodeResult, DecodeSettings, RuntimeParams, nonfinite_rows, prefill
from eagle3_jax.decoding.loop import run_loop
from eagle3_jax.decoding.tree import Tree, TreeSpec, draft_tree, root_candidates, verify_attention
from eagle3_jax.decoding.verify import Acceptance, accept_greedy, accept_sampling
from eagle3_jax.kv_cache import KVCache, aligned_capacity
from eagle3_jax.models.eagle3 import Eagle3DraftHead
from eagle3_jax.models.target import ForwardOutput, TargetModel
from eagle3_jax.sampling import all_greedy, next_keys, row_keys, select_tokens


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
      result: tokens, counters and accept lengths.
      rng: [batch] PRNG keys, one per row (``sampling.row_keys``).
      iterations: int32 loop iterations run so far (for chunked streaming).
    """

    target_cache: KVCache
    draft_cache: KVCache
    root: jax.Array = axes_field(ROWS)
    root_children: jax.Array = axes_field(ROWS)
    root_logp: jax.Array = axes_field(ROWS)
    root_hidden: jax.Array = axes_field(ROWS)
    result: DecodeResult
    rng: jax.Array = axes_field(ROWS)
    iterations: jax.Array = axes_field(SHARED)

    @property
    def accept_lengths(self) -> jax.Array:
        """[batch, max_new_tokens] tokens appended per cycle (``result.accept_lengths``)."""
        return self.result.accept_lengths


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftRoot:
    """What an extend leaves for the next tree: the root's top-K children.

    Attributes:
      children, logp: [batch, K] target ids and draft log-probs.
      hidden: [batch, hidden] the draft's ``g`` at the last extended position.
      cache: the draft cache with the extend's K/V, lengths advanced.
    """

    children: jax.Array
    logp: jax.Array
    hidden: jax.Array
    cache: KVCache


def cache_headroom(spec: TreeSpec) -> int:
    """Slots beyond the user-visible capacity, so provisional tree writes always fit."""
    return spec.num_draft_tokens + spec.draft_slots


def embedder(target: TargetModel, draft: Eagle3DraftHead):
    """Token ids -> embeddings for the draft: its own table if it kept one, else the target's."""
    if draft.embed_tokens is not None:
        return draft.embed_tokens
    return target.embed


# ------------------------------------------------------------------ phases

def extend(target: TargetModel, head: Eagle3DraftHead, cache: KVCache, next_tokens: jax.Array,
           features: jax.Array, counts: jax.Array, spec: TreeSpec, settings: DecodeSettings) -> DraftRoot:
    """Runs the draft over newly committed positions n .. n+count-1 (n = ``cache.lengths``).

    Position n+j pairs the target feature f_{n+j} with the token after it,
    ``next_tokens[:, j]``; its K/V go to draft slot n+j (for j < count). The
    root's children come from the logits at the last position, n+count-1.

    Args:
      next_tokens: [batch, T] int32 x_{n+j+1}; features: [batch, T, 3 * target_hidden].
      counts: [batch] int32 positions to commit per row (0 writes nothing; that
        row's children are then meaningless and must not be used).
    """
    with jax.named_scope("extend"):
        n = cache.lengths
        width = next_tokens.shape[1]
        j = jnp.arange(width, dtype=jnp.int32)[None, :]
        meta = AttentionMetadata.causal(n, width, write=j < counts[:, None], backend=settings.attention)
        last = jnp.maximum(counts - 1, 0)[:, None]
        out = head(embedder(target, head)(next_tokens), features, cache, meta, hidden_is_features=True,
                   logits_indices=last)
        children, logp = root_candidates(out.logits[:, 0], head, spec.topk)
        hidden = jnp.take_along_axis(out.hidden, last[:, :, None], axis=1)[:, 0]
        return DraftRoot(children=children, logp=logp, hidden=hidden, cache=out.cache.with_lengths(n + counts))


def draft(target: TargetModel, head: Eagle3DraftHead, state: SpecLoopState, active: jax.Array, spec: TreeSpec,
          settings: DecodeSettings) -> tuple[Tree, KVCache]:
    """Drafts a tree per row from the root (``decoding/tree.py: draft_tree``)."""
    with jax.named_scope("draft"):
        return draft_tree(head, embedder(target, head), state.draft_cache, state.root, state.root_children,
                          state.root_logp, state.root_hidden, active, spec, backend=settings.attention)


def verify(target: TargetModel, head: Eagle3DraftHead, tree: Tree, cache: KVCache, active: jax.Array,
           settings: DecodeSettings) -> ForwardOutput:
    """One target forward over the N tree tokens (K/V provisionally at slots n .. n+N-1),
    returning their logits and the draft's feature layers."""
    with jax.named_scope("verify"):
        meta = verify_attention(tree, cache.lengths, active, backend=settings.attention)
        return target(tree.tokens, cache, meta, feature_layers=head.config.feature_layers(target.config))


def accept(tree: Tree, logits: jax.Array, rng: jax.Array, active: jax.Array, params: RuntimeParams,
           settings: DecodeSettings, spec: TreeSpec) -> tuple[Acceptance, jax.Array, jax.Array]:
    """Picks each row's accepted path and bonus token (``decoding/verify.py``).

    Returns:
      (the acceptance, [batch] tokens to commit (0 for inactive and
      non-finite rows), [batch] bool rows whose tree or draft logits were not finite).
    """
    with jax.named_scope("accept"):
        def greedy() -> Acceptance:
            return accept_greedy(tree, logits, spec.num_steps)

        def sampled() -> Acceptance:
            rows = params.rows
            acc = accept_sampling(tree, logits, rng, params.temperature, params.top_p, top_k=settings.top_k,
                                  depth_max=spec.num_steps, row_top_k=None if rows is None else rows.top_k)
            if rows is None:
                return acc
            pick = rows.greedy  # greedy rows of a sampling program: greedy acceptance
            return jax.tree.map(lambda g, s: jnp.where(pick.reshape(pick.shape + (1,) * (g.ndim - 1)), g, s),
                                greedy(), acc)

        if settings.greedy:
            acc = greedy()
        elif params.rows is None:
            acc = sampled()
        else:  # greedy as a runtime value: all-greedy batches skip the sampling at run time
            acc = jax.lax.cond(all_greedy(params.rows), greedy, sampled)
        nonfinite = active & (~tree.draft_finite | nonfinite_rows(logits))
        return acc, jnp.where(active & ~nonfinite, acc.length, 0), nonfinite


def commit(cache: KVCache, result: DecodeResult, tree: Tree, acc: Acceptance, length: jax.Array,
           nonfinite: jax.Array, active: jax.Array, params: RuntimeParams, settings: DecodeSettings
           ) -> tuple[KVCache, DecodeResult, jax.Array]:
    """Gathers the accepted path's K/V into contiguous slots n .. n+L-1 and appends its tokens.

    Returns:
      (the target cache with lengths n + L, the result, the emitted tokens [batch, D+1]).
    """
    with jax.named_scope("commit"):
        n = cache.lengths
        width = tree.tokens.shape[1]  # the N tree nodes were verified at slots n .. n + N - 1
        j = jnp.arange(acc.path.shape[1], dtype=jnp.int32)[None, :]
        dst = jnp.where(j < length[:, None], j, width)  # past the accepted length: dropped
        cache = cache.move_in_window(n, acc.path, dst, width).with_lengths(n + length)
        emitted = acc.emitted(tree)  # [batch, D+1]
        result = result.append(emitted, length, settings, params, forwards=active.astype(jnp.int32),
                               nonfinite=nonfinite)
        return cache, result, emitted


# ------------------------------------------------------------------ the loop

def start(target: TargetModel, head: Eagle3DraftHead, tokens: jax.Array, prompt_lengths: jax.Array,
          rng: jax.Array, params: RuntimeParams, settings: DecodeSettings, spec: TreeSpec) -> SpecLoopState:
    """Prefills the target (with features), picks the first token, and extends the draft over the prompt.

    Args:
      tokens: [batch, bucket] int32 right-padded prompts; prompt_lengths: [batch].
      rng: a PRNG key (row i draws with ``fold_in(rng, i)``) or [batch] keys, one per row.
    """
    layers = head.config.feature_layers(target.config)
    alloc = dataclasses.replace(settings, capacity=settings.capacity + cache_headroom(spec))
    logits, target_cache, features = prefill(target, tokens, prompt_lengths, alloc, layers)
    rng, sub = next_keys(row_keys(rng, tokens.shape[0]), settings)
    first = select_tokens(logits, sub, params.temperature, params.top_p, greedy=settings.greedy, top_k=settings.top_k,
                          rows=params.rows)

    batch, bucket = tokens.shape
    cfg = head.config
    draft_cache = KVCache.create(num_layers=1, batch=batch, capacity=aligned_capacity(alloc.capacity),
                                 kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=settings.cache_dtype,
                                 axes=DRAFT_KV_CACHE_AXES)
    # Draft input at position t pairs the target feature f_t with token x_{t+1}; x_P is the first new token.
    idx = jnp.arange(bucket, dtype=jnp.int32)[None, :]
    shifted = jnp.concatenate([tokens[:, 1:], jnp.zeros((batch, 1), tokens.dtype)], axis=1)
    shifted = jnp.where(idx == (prompt_lengths - 1)[:, None], first[:, None], shifted)
    root = extend(target, head, draft_cache, shifted, features, prompt_lengths, spec, settings)
    result = DecodeResult.start(first, settings, prompt_lengths, params, nonfinite=nonfinite_rows(logits))
    return SpecLoopState(
        target_cache=target_cache, draft_cache=root.cache, root=first, root_children=root.children,
        root_logp=root.logp, root_hidden=root.hidden, result=result, rng=rng, iterations=jnp.zeros((), jnp.int32))


def step(target: TargetModel, head: Eagle3DraftHead, state: SpecLoopState, params: RuntimeParams,
         settings: DecodeSettings, spec: TreeSpec) -> SpecLoopState:
    """One draft-verify-accept-commit-extend cycle for every unfinished row.

    A row whose tree logits (target) or drafting logits are not finite
    commits nothing and finishes with 'nonfinite' (see the module docstring).
    """
    active = state.result.finish_reason == 0
    tree, dcache = draft(target, head, state, active, spec, settings)
    out = verify(target, head, tree, state.target_cache, active, settings)
    rng, sub = next_keys(state.rng, settings)
    acc, length, nonfinite = accept(tree, out.logits, sub, active, params, settings, spec)
    tcache, result, emitted = commit(out.cache, state.result, tree, acc, length, nonfinite, active, params, settings)
    # The draft extends over the accepted tokens: (f at path node j, the token after it).
    feats = jnp.take_along_axis(out.features, acc.path[:, :, None], axis=1)
    root = extend(target, head, dcache, emitted, feats, length, spec, settings)  # dcache.lengths is still n
    new_root = jnp.take_along_axis(emitted, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]

    keep = active[:, None]
    return SpecLoopState(
        target_cache=tcache, draft_cache=root.cache,
        root=jnp.where(active, new_root, state.root),
        root_children=jnp.where(keep, root.children, state.root_children),
        root_logp=jnp.where(keep, root.logp, state.root_logp),
        root_hidden=jnp.where(keep, root.hidden, state.root_hidden),
        result=result, rng=rng, iterations=state.iterations + 1)


def decode_loop(target: TargetModel, head: Eagle3DraftHead, state: SpecLoopState, params: RuntimeParams,
                settings: DecodeSettings, spec: TreeSpec, max_iterations: jax.Array | None = None) -> SpecLoopState:
    """Runs :func:`step` until every row is done (or ``max_iterations`` more cycles ran, for streaming)."""
    return run_loop(lambda s: step(target, head, s, params, settings, spec), state, max_iterations)


def generate(target: TargetModel, head: Eagle3DraftHead, tokens: jax.Array, prompt_lengths: jax.Array,
             rng: jax.Array, params: RuntimeParams, settings: DecodeSettings, spec: TreeSpec) -> SpecLoopState:
    """The whole speculative generation as one pure function (usable under an outer ``jax.jit``);
    the final state's ``result`` is the :class:`DecodeResult` plain decoding returns too."""
    state = start(target, head, tokens, prompt_lengths, rng, params, settings, spec)
    return decode_loop(target, head, state, params, settings, spec)
