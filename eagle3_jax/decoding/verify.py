"""Accepting a verified tree: greedy matching and lossless speculative sampling.

Both return the accepted path (root first) and the bonus token drawn from the
target at the last accepted node, so the emitted tokens per cycle are the
path's draft tokens plus the bonus (1 .. D+1 of them).

* Greedy: a node is accepted when its token equals the target's argmax at its
  parent and its parent is accepted; the deepest accepted node ends the path.
* Sampling: recursive rejection over siblings. At the current node with the
  target's (temperature / top-k / top-p) distribution p, try its children in
  order: accept child c with probability p(c); on rejection set p(c) = 0 and
  renormalise before the next sibling. If all are rejected (or there are
  none), draw the bonus from what remains. The output is distributed exactly
  as plain sampling from the target.

Both assume finite logits: with a NaN the argmax or the draw is arbitrary.
The speculative loop checks every tree logit (``nonfinite_rows``) and commits
nothing from a row with a non-finite one, so what these return for it is
never used.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from eagle3_jax.decoding.tree import Tree
from eagle3_jax.sampling import categorical_rows, filter_logits, split_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Acceptance:
    """Attributes:
      path: [batch, D+1] int32 tree indices of the accepted nodes, root first;
        entries at and past ``length`` repeat the last accepted node.
      length: [batch] int32 accepted nodes, root included (1..D+1); also the
        number of tokens emitted (the path's draft tokens plus the bonus).
      bonus: [batch] int32 the token drawn from the target after the path.
    """

    path: jax.Array
    length: jax.Array
    bonus: jax.Array

    def emitted(self, tree: Tree) -> jax.Array:
        """[batch, D+1] the tokens this cycle emits (``length`` of them): the path after the root, then the bonus."""
        depth1 = self.path.shape[1]
        nxt = jnp.take_along_axis(tree.tokens, self.path[:, 1:], axis=1)
        nxt = jnp.concatenate([nxt, jnp.zeros_like(nxt[:, :1])], axis=1)
        j = jnp.arange(depth1)[None, :]
        return jnp.where(j + 1 < self.length[:, None], nxt, self.bonus[:, None])


def _path_to(tree: Tree, last: jax.Array, depth_max: int) -> jax.Array:
    """Tree indices from the root to ``last`` [batch], padded with ``last``: [batch, D+1]."""
    on_path = jnp.take_along_axis(tree.ancestors, last[:, None, None], axis=1)[:, 0]  # [batch, N]
    at_depth = on_path[:, None, :] & (tree.depths[:, None, :] == jnp.arange(depth_max + 1)[None, :, None])
    return jnp.where(jnp.any(at_depth, axis=-1), jnp.argmax(at_depth, axis=-1), last[:, None]).astype(jnp.int32)


def accept_greedy(tree: Tree, logits: jax.Array, depth_max: int) -> Acceptance:
    """Longest path whose every token is the target's argmax at its parent.

    Args:
      logits: [batch, N, vocab] the target's logits at every tree node.
    """
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [batch, N]
    match = tree.tokens == jnp.take_along_axis(argmax, tree.parents, axis=1)
    is_root = jnp.arange(tree.tokens.shape[1])[None, :] == 0
    accepted = is_root
    for _ in range(depth_max):
        accepted = is_root | (match & jnp.take_along_axis(accepted, tree.parents, axis=1))
    last = jnp.argmax(jnp.where(accepted, tree.depths, -1), axis=1).astype(jnp.int32)
    length = jnp.take_along_axis(tree.depths, last[:, None], axis=1)[:, 0] + 1
    bonus = jnp.take_along_axis(argmax, last[:, None], axis=1)[:, 0]
    return Acceptance(path=_path_to(tree, last, depth_max), length=length, bonus=bonus)


def accept_sampling(tree: Tree, logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array,
                    *, top_k: int, depth_max: int, row_top_k: jax.Array | None = None) -> Acceptance:
    """Lossless recursive rejection sampling over siblings (see the module docstring).

    Args:
      rng: [batch] PRNG keys, one per row (a row's draws use its own key only).
      temperature, top_p: scalars or [batch]; row_top_k: None or [batch] (``sampling.filter_logits``).
    """
    batch, n_tree, _ = logits.shape
    node = jnp.arange(n_tree)[None, :]

    def probs_at(cur):
        row = jnp.take_along_axis(logits, cur[:, None, None], axis=1)[:, 0]
        return jax.nn.softmax(filter_logits(row, temperature, top_p, top_k, row_top_k), axis=-1)

    def children_of(cur):
        return (tree.parents == cur[:, None]) & (node != 0)

    cur = jnp.zeros((batch,), jnp.int32)
    length = jnp.ones((batch,), jnp.int32)
    stopped = jnp.zeros((batch,), bool)
    keys = split_rows(rng, depth_max + 1)  # depth_max + 1 arrays of [batch] keys
    for d in range(depth_max):
        p = probs_at(cur)
        child = children_of(cur) & ~stopped[:, None]
        pc = jnp.where(child, jnp.take_along_axis(p, tree.tokens, axis=1), 0.0)
        before = jnp.cumsum(pc, axis=1) - pc  # mass of the earlier siblings, already rejected
        u = jax.vmap(lambda k: jax.random.uniform(k, (n_tree,)))(keys[d])  # [batch, n_tree]
        ok = child & (u * (1.0 - before) < pc)
        take = jnp.any(ok, axis=1)
        cur = jnp.where(take, jnp.argmax(ok, axis=1), cur).astype(jnp.int32)
        length = length + take
        stopped = stopped | ~take
    # The bonus: the target's distribution at the last node without its (rejected) children.
    p = probs_at(cur)
    rejected = jnp.zeros_like(p).at[jnp.arange(batch)[:, None], tree.tokens].max(
        children_of(cur).astype(p.dtype))
    residual = p * (1.0 - rejected)
    residual = jnp.where(jnp.sum(residual, axis=1, keepdims=True) > 0, residual, p)
    bonus = categorical_rows(keys[-1], jnp.log(residual))
    return Acceptance(path=_path_to(tree, cur, depth_max), length=length, bonus=bonus)
