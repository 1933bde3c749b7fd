"""Fixed-shape token-tree drafting (EAGLE-2/3 with SGLang's knobs).

Static shapes, per batch row (docs/architecture.md#draft-tree):

    step 1:    the root's draft logits -> top K tokens, scores = log-probs    # beam [K]
    step d>1:  the K beam nodes go through the draft (one forward of K
               tokens); each keeps its top K children, score = parent + logp
               -> K*K candidates; the best K become the next beam
    candidates: C = K + (D-1)*K*K slots of (token, score, parent slot, depth)
    tree:      the root plus the N-1 best candidates, ordered by slot

Ranking by (score descending, slot ascending) keeps the tree
ancestor-closed even with ties: a parent's score is never below its child's
and its slot is always lower. Draft K/V written while drafting go to
provisional slots after the committed length and are never committed; the
extend over accepted tokens overwrites them.

Non-finite draft logits (a NaN / inf in the head) would corrupt the ranking,
and with it the tree's structure, so a tree records whether every draft logit
it was built from was finite (``Tree.draft_finite``); the speculative loop
finishes a row drafted from non-finite logits as 'nonfinite'.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from eagle3_jax.attention import DEFAULT_BACKEND, AttentionMetadata
from eagle3_jax.errors import InputError
from eagle3_jax.kv_cache import KVCache
from eagle3_jax.models.eagle3 import Eagle3DraftHead

# Limits of the tree shape. The draft steps are unrolled in the compiled loop, so compile time
# grows with the depth, and each step ranks K*K candidates. Published EAGLE-3 settings stay far
# inside them: SGLang's (7, 10, 60) and the EAGLE papers' depth 8 and 60-64 verified tokens.
MAX_NUM_STEPS = 16
MAX_TOPK = 16
MAX_DRAFT_TOKENS = 256

# Default tree shapes, (num_steps, topk, num_draft_tokens); TreeSpec.resolve fills in what a caller leaves out.
# The library's default (Generator, `eagle3-jax generate` and `regenerate`): the chain (3, 1, 4), the shape the
# model card of the published Qwen3-4B-Thinking-2507 EAGLE-3 head reports its acceptance lengths for.
DEFAULT_TREE = (3, 1, 4)
# `eagle3-jax demo` (and the quickstart notebook in demo mode) uses the chain (4, 1, 5) instead: the embedded demo
# head, trained with 7 training-time-test steps on the demo target's own continuations of code, is still accepted
# one step deeper (held-out stdlib code: 1.91 tokens per target forward against 1.84 for (3, 1, 4); docs/demo.md).
DEMO_TREE = (4, 1, 5)
# A wide tree, SGLang's (7, 10, 60): `eagle3-jax eval` compares it with DEFAULT_TREE unless --knobs says otherwise.
WIDE_TREE = (7, 10, 60)


class NumDraftTokensRequired(InputError):
    """A tree (topk > 1) was asked for without num_draft_tokens, which has no default then."""


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """Static shape of the draft tree (SGLang's speculative knobs).

    Attributes:
      num_steps: depth D, the draft steps per cycle (the root's children are
        depth 1); at most ``MAX_NUM_STEPS``.
      topk: K, children kept per expanded node and the beam width; at most ``MAX_TOPK``.
      num_draft_tokens: N, tree nodes verified per cycle, the root included;
        at most ``MAX_DRAFT_TOKENS``.
    """

    num_steps: int
    topk: int
    num_draft_tokens: int

    def __post_init__(self):
        d, k, n = self.num_steps, self.topk, self.num_draft_tokens
        for name, value in (("num_steps", d), ("topk", k), ("num_draft_tokens", n)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        for name, value, limit in (("num_steps", d, MAX_NUM_STEPS), ("topk", k, MAX_TOPK),
                                   ("num_draft_tokens", n, MAX_DRAFT_TOKENS)):
            if value > limit:
                raise InputError(f"{name}={value} exceeds the limit of {limit} (published EAGLE-3 trees use "
                                 "at most depth 8, top-k 10 and 64 verified tokens)")
        if n < 2:
            raise InputError("num_draft_tokens must be at least 2 (the root and one draft token)")
        if k == 1 and n != d + 1:
            raise InputError(f"with topk=1 the tree is a chain: num_draft_tokens must be num_steps + 1 = {d + 1}, "
                             f"got {n}")
        if n - 1 > self.num_candidates:
            raise InputError(f"num_draft_tokens={n} exceeds what num_steps={d}, topk={k} can draft: at most "
                             f"{self.num_candidates + 1} (1 + K + (D-1)*K*K)")

    @classmethod
    def resolve(cls, num_steps: int | None = None, topk: int | None = None, num_draft_tokens: int | None = None,
                *, default: tuple[int, int, int] = DEFAULT_TREE) -> TreeSpec:
        """The tree shape from the knobs a caller gave (None: not given), with ``default`` for the rest.

        Nothing given: ``default`` itself. Otherwise a missing ``num_steps``
        or ``topk`` is the default's, and a missing ``num_draft_tokens`` is
        ``num_steps + 1`` for a chain (topk 1); a tree (topk > 1) needs it
        (:class:`NumDraftTokensRequired`). The shape is then checked as
        ``TreeSpec(...)`` checks it (InputError).
        """
        if num_steps is None and topk is None and num_draft_tokens is None:
            return cls(*default)
        num_steps = default[0] if num_steps is None else num_steps
        topk = default[1] if topk is None else topk
        if num_draft_tokens is None:
            if topk != 1:
                raise NumDraftTokensRequired("num_draft_tokens is required when topk > 1")
            num_draft_tokens = num_steps + 1
        return cls(num_steps, topk, num_draft_tokens)

    @property
    def knobs(self) -> tuple[int, int, int]:
        """(num_steps, topk, num_draft_tokens)."""
        return self.num_steps, self.topk, self.num_draft_tokens

    @property
    def num_candidates(self) -> int:
        return self.topk + (self.num_steps - 1) * self.topk * self.topk

    @property
    def draft_slots(self) -> int:
        """Provisional draft-cache slots one cycle writes past the committed length."""
        return max((self.num_steps - 1) * self.topk, self.num_steps + 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tree:
    """A drafted tree, per batch row.

    Attributes:
      tokens: [batch, N] int32 target token ids; node 0 is the root.
      parents: [batch, N] int32 tree index of each node's parent (root: 0).
      depths: [batch, N] int32 (root: 0).
      ancestors: [batch, N, N] bool, ancestors[i, j]: j is i or an ancestor of i.
      draft_finite: [batch] bool, every draft logit behind the tree was
        finite: the root's (``root_candidates`` turns non-finite ones into
        NaN ``root_logp``) and each drafting step's.
    """

    tokens: jax.Array
    parents: jax.Array
    depths: jax.Array
    ancestors: jax.Array
    draft_finite: jax.Array


def ancestor_closure(parents: jax.Array, depth_bound: int) -> jax.Array:
    """[..., N, N] ancestor-or-self mask from parent indices [..., N] (root's parent = itself)."""
    n = parents.shape[-1]
    mask = jnp.broadcast_to(jnp.eye(n, dtype=bool), parents.shape + (n,))
    for _ in range(depth_bound):
        mask = mask | jnp.take_along_axis(mask, parents[..., :, None], axis=-2)
    return mask


def root_candidates(logits: jax.Array, head: Eagle3DraftHead, topk: int) -> tuple[jax.Array, jax.Array]:
    """Top-K children of the root from its draft logits [batch, draft_vocab]: (target ids, log-probs), [batch, K].

    A row whose logits are not all finite gets NaN log-probs, so that the tree
    drafted from them has ``draft_finite`` False.
    """
    logits = logits.astype(jnp.float32)
    logp, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), topk)
    finite = jnp.all(jnp.isfinite(logits), axis=-1, keepdims=True)
    return head.to_target_ids(ids), jnp.where(finite, logp, jnp.nan)


def draft_tree(head: Eagle3DraftHead, embed, cache: KVCache, root_token: jax.Array, root_children: jax.Array,
               root_logp: jax.Array, root_hidden: jax.Array, active: jax.Array, spec: TreeSpec, *,
               backend: str = DEFAULT_BACKEND) -> tuple[Tree, KVCache]:
    """Drafts one tree per row.

    Args:
      head: the draft head.
      embed: token ids [...] -> embeddings [..., hidden] (the target's table).
      cache: the draft cache; ``lengths`` = n, the committed length (the root
        token x_n is not in it; its draft step 1 is the last extend position).
      root_token: [batch] the root x_n.
      root_children, root_logp: [batch, K] the root's top-K children (target
        ids) and their log-probs, from the extend that ended at position n-1.
      root_hidden: [batch, hidden] ``g`` of that last extend position.
      active: [batch] bool; finished rows write nothing.
      backend: static attention backend name.
    Returns:
      The tree and the draft cache (with provisional writes past ``lengths``).
      ``tree.draft_finite`` is False for a row whose ``root_logp`` or
      drafting logits had a NaN / inf (its tree may then be malformed).
    """
    k, depth_max, n_tree = spec.topk, spec.num_steps, spec.num_draft_tokens
    batch = root_token.shape[0]
    n = cache.lengths
    prov = (depth_max - 1) * k  # provisional slots used by steps 2..D
    tokens = [root_children]
    scores = [root_logp]
    parents = [jnp.full((batch, k), -1, jnp.int32)]
    depths = [jnp.ones((batch, k), jnp.int32)]
    beam_slot = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (batch, k))  # candidate slot of each beam node
    beam_token, beam_score = root_children, root_logp
    beam_hidden = jnp.broadcast_to(root_hidden[:, None, :], (batch, k, root_hidden.shape[-1]))
    beam_anc = jnp.zeros((batch, k, max(prov, 1)), bool)  # provisional slots of each beam node's ancestors
    offset = k
    draft_finite = jnp.all(jnp.isfinite(root_logp), axis=-1)
    for step in range(2, depth_max + 1):
        own = (step - 2) * k + jnp.arange(k, dtype=jnp.int32)  # this step's provisional offsets
        anc = beam_anc | (jnp.arange(beam_anc.shape[-1])[None, None, :] == own[None, :, None])
        positions = jnp.broadcast_to((n + step - 2)[:, None], (batch, k))
        # the beam sees the committed prefix and its own ancestry among the provisional slots
        meta = AttentionMetadata.window_of(n, positions, own[None, :], anc, write=active, backend=backend)
        out = head(embed(beam_token), beam_hidden, cache, meta, hidden_is_features=False)
        cache = out.cache
        draft_finite = draft_finite & jnp.all(jnp.isfinite(out.logits), axis=(1, 2))
        logp, ids = jax.lax.top_k(jax.nn.log_softmax(out.logits, axis=-1), k)  # [batch, K, K]
        child_score = (beam_score[:, :, None] + logp).reshape(batch, k * k)
        child_token = head.to_target_ids(ids).reshape(batch, k * k)
        child_parent = jnp.repeat(beam_slot, k, axis=1)
        tokens.append(child_token)
        scores.append(child_score)
        parents.append(child_parent)
        depths.append(jnp.full((batch, k * k), step, jnp.int32))
        # The next beam: the K best children; each inherits its parent's hidden and ancestry.
        beam_score, best = jax.lax.top_k(child_score, k)
        from_beam = best // k
        beam_token = jnp.take_along_axis(child_token, best, axis=1)
        beam_slot = offset + best
        beam_hidden = jnp.take_along_axis(out.hidden, from_beam[:, :, None], axis=1)
        beam_anc = jnp.take_along_axis(anc, from_beam[:, :, None], axis=1)
        offset += k * k

    cand_token = jnp.concatenate(tokens, axis=1)  # [batch, C]
    cand_score = jnp.concatenate(scores, axis=1)
    cand_parent = jnp.concatenate(parents, axis=1)
    cand_depth = jnp.concatenate(depths, axis=1)
    num_cand = cand_token.shape[1]
    index = jnp.broadcast_to(jnp.arange(num_cand, dtype=jnp.int32), (batch, num_cand))
    _, ranked = jax.lax.sort((-cand_score, index), dimension=1, num_keys=2)
    chosen = jnp.sort(ranked[:, : n_tree - 1], axis=1)  # [batch, N-1] candidate slots, in slot order
    parent_slot = jnp.take_along_axis(cand_parent, chosen, axis=1)
    parent_pos = jax.vmap(jnp.searchsorted)(chosen, jnp.maximum(parent_slot, 0))
    tree_parent = jnp.where(parent_slot < 0, 0, parent_pos + 1).astype(jnp.int32)
    tree = Tree(
        tokens=jnp.concatenate([root_token[:, None], jnp.take_along_axis(cand_token, chosen, axis=1)], axis=1),
        parents=jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), tree_parent], axis=1),
        depths=jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.take_along_axis(cand_depth, chosen, axis=1)],
                               axis=1),
        ancestors=None,
        draft_finite=draft_finite,
    )
    return dataclasses.replace(tree, ancestors=ancestor_closure(tree.parents, depth_max)), cache


def verify_attention(tree: Tree, lengths: jax.Array, active: jax.Array, *,
                     backend: str = DEFAULT_BACKEND) -> AttentionMetadata:
    """Attention of the target over a tree written at slots ``lengths + i`` (node i), at
    positions ``lengths + depth``: the committed prefix plus each node's ancestors and
    itself. Rows not ``active`` [batch] write nothing."""
    n_tree = tree.tokens.shape[1]
    return AttentionMetadata.window_of(lengths, lengths[:, None] + tree.depths,
                                       jnp.arange(n_tree, dtype=jnp.int32)[None, :], tree.ancestors, write=active,
                                       backend=backend)
