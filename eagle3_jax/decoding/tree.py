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

from eagle3_jax.errors import InputError
from eagle3_jax.kv_cache import KVCache
from eagle3_jax.models.eagle3 import Eagle3DraftHead


# Limits of the tree shape. The draft steps are unrolled in the compiled loop, so compile time
# grows with the depth, and each step ranks K*K candidates. Published EAGLE-3 settings stay far
# inside them: SGLang's (7, 10, 60) and the EAGLE papers' depth 8 and 60-64 verified tokens.
MAX_NUM_STEPS = 16
MAX_TOPK = 16
MAX_DRAFT_TOKENS = 256


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
               root_logp: jax.Array, root_hidden: jax.Array, active: jax.Array, spec: TreeSpec
               ) -> tuple[Tree, KVCache]:
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
    Returns:
      The tree and the draft cache (with provisional writes past ``lengths``).
      ``tree.draft_finite`` is False for a row whose ``root_logp`` or
      drafting logits had a NaN / inf (its tree may then be malformed).
    """
    k, depth_max, n_tree = spec.topk, spec.num_steps, spec.num_draft_tokens
    batch = root_token.shape[0]
    n = cache.lengths
    cap = cache.capacity
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
        visible = prefix_plus(anc, n, cap)
        slots = jnp.where(active[:, None], n[:, None] + own[None, :], cap)
        positions = jnp.broadcast_to((n + step - 2)[:, None], (batch, k))
        out = head(embed(beam_token), beam_hidden, positions, cache, slots, visible, hidden_is_features=False)
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


def prefix_plus(bits: jax.Array, lengths: jax.Array, capacity: int) -> jax.Array:
    """[batch, q, capacity] bool: every committed slot (< length) plus slot length + j where bits[..., j].

    Args:
      bits: [batch, q, width] bool over the provisional slots right after each row's committed length.
      lengths: [batch] committed lengths.
    """
    width = bits.shape[-1]
    rel = jnp.arange(capacity, dtype=jnp.int32)[None, None, :] - lengths[:, None, None]
    picked = jnp.take_along_axis(bits, jnp.broadcast_to(jnp.clip(rel, 0, width - 1), bits.shape[:2] + (capacity,)),
                                 axis=-1)
    return (rel < 0) | ((rel < width) & picked)


def tree_attention_mask(tree: Tree, lengths: jax.Array, capacity: int) -> jax.Array:
    """[batch, N, capacity] bool for verifying a tree written at slots lengths + i:
    the committed prefix plus each node's ancestors and itself."""
    return prefix_plus(tree.ancestors, lengths, capacity)
