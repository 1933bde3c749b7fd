"""The training-time-test objective of EAGLE-3 (SpecForge's defaults).

For a batch of sequences the frozen target gives, at every index t, the
features f_t and its logits at t+1 (the distribution of x_{t+2}). The draft
is unrolled ``ttt_length`` steps; step i feeds back the previous step's ``g``,
reads the tokens shifted i places further (input x_{t+1+i}), sits at
positions t+i, and is scored against the target's distribution at t+1+i
restricted to the draft vocabulary:

    loss_i = -sum_t pm_i[t] * sum_v p_i[t, v] log q_i[t, v] / (batch * seq)
    loss   = sum_i 0.8**i * loss_i

where ``pm_i[t]`` is 1 when the loss mask is 1 at t+i and the target's argmax
there is in the draft vocabulary. Accuracy per step counts the draft's
argmax (mapped to target ids) against the target's argmax over loss-masked
positions. As in SpecForge, the loss mask is read at the index of the hidden
state (t), not of the predicted token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from eagle3_jax.models.eagle3 import Eagle3DraftHead
from eagle3_jax.models.target import TargetModel
from eagle3_jax.training.ttt_attention import TTTHistory, ttt_step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Teacher:
    """What the frozen target provides for one batch, aligned for the draft.

    Attributes:
      input_ids: [batch, seq] int32, x_{t+1} at index t (0 past the end).
      features: [batch, seq, 3 * target_hidden] f_t.
      target_p: [batch, seq, draft_vocab] float32, softmax of the target's
        logits at t+1 over the draft vocabulary.
      target_ids: [batch, seq] int32, the target's argmax at t+1 (full vocabulary).
      position_mask: [batch, seq] float32, loss_mask[t] * t2d[target_ids[t]].
      loss_mask: [batch, seq] float32.
      valid: [batch, seq] bool, real (non-padding) tokens.
    """

    input_ids: jax.Array
    features: jax.Array
    target_p: jax.Array
    target_ids: jax.Array
    position_mask: jax.Array
    loss_mask: jax.Array
    valid: jax.Array


def shift_left(x: jax.Array, n: int, fill=0) -> jax.Array:
    """x[:, t] -> x[:, t + n], padding the end with ``fill``."""
    if n == 0:
        return x
    pad = jnp.full((x.shape[0], n) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, n:], pad], axis=1)


def teacher_from_logits(tokens, features, logits, loss_mask, valid, draft_ids, t2d) -> Teacher:
    """Aligns target outputs for the draft.

    Args:
      tokens: [batch, seq] int32 the sequences.
      features: [batch, seq, 3H] the target's features at each index.
      logits: [batch, seq, vocab] the target's logits at each index (unshifted).
      loss_mask, valid: [batch, seq].
      draft_ids: [draft_vocab] int32 target ids of the draft vocabulary (ascending).
      t2d: [vocab] bool.
    """
    logits = logits.astype(jnp.float32)
    return teacher_from_draft_logits(tokens, features, jnp.take(logits, draft_ids, axis=-1),
                                     jnp.argmax(logits, axis=-1).astype(jnp.int32), loss_mask, valid, t2d)


def teacher_from_draft_logits(tokens, features, draft_logits, target_ids, loss_mask, valid, t2d) -> Teacher:
    """:func:`teacher_from_logits` from the target's logits over the draft vocabulary alone, [batch, seq,
    draft_vocab], and its argmax over the whole vocabulary, [batch, seq] (both at each index, unshifted): what a
    precomputed teacher keeps, so that a training step reads only the draft vocabulary's rows of the output layer.
    """
    draft_logits = shift_left(draft_logits.astype(jnp.float32), 1)
    target_ids = shift_left(target_ids.astype(jnp.int32), 1)  # 0 past the end, as the argmax of the zero row
    loss_mask = loss_mask.astype(jnp.float32)
    return Teacher(input_ids=shift_left(tokens, 1), features=features,
                   target_p=jax.nn.softmax(draft_logits, axis=-1), target_ids=target_ids,
                   position_mask=loss_mask * t2d[target_ids].astype(jnp.float32), loss_mask=loss_mask,
                   valid=valid.astype(bool))


def run_target(target: TargetModel, tokens, loss_mask, valid, draft_ids, t2d,
               feature_layers: tuple[int, ...]) -> Teacher:
    """The frozen target's forward over a batch (no gradient flows into it)."""
    out = target.forward_sequence(tokens, valid, feature_layers=feature_layers)
    teacher = teacher_from_logits(tokens, out.features, out.logits, loss_mask, valid, draft_ids, t2d)
    return jax.tree.map(jax.lax.stop_gradient, teacher)


def ttt_loss(head: Eagle3DraftHead, teacher: Teacher, embed, ttt_length: int, decay: float = 0.8):
    """The weighted TTT loss and its per-step parts.

    Args:
      head: the draft head (its parameters are what the gradient is taken of).
      teacher: aligned target outputs (:func:`teacher_from_logits`).
      embed: token ids -> embeddings (the target's frozen table).
    Returns:
      (loss, {"loss": [ttt] per-step losses, "kl": [ttt] per-step losses minus
      the teacher's entropy (the part training can remove; 0 at best), "acc":
      [ttt] per-step accuracies, "correct": [ttt], "counted": [ttt]}).
    """
    batch, seq = teacher.input_ids.shape
    base = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    hidden = teacher.features
    history = TTTHistory()
    losses, kls, correct, counted = [], [], [], []
    for i in range(ttt_length):
        ids = shift_left(teacher.input_ids, i)
        logits, hidden, history = ttt_step(head, embed(ids), hidden, base + i, history, teacher.valid,
                                           hidden_is_features=i == 0)
        p = shift_left(teacher.target_p, i, fill=1.0 / teacher.target_p.shape[-1])
        pm = shift_left(teacher.position_mask, i)
        lm = shift_left(teacher.loss_mask, i)
        logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        losses.append(-jnp.sum(pm[..., None] * p * logq) / (batch * seq))
        entropy = -jnp.sum(pm[..., None] * jax.scipy.special.xlogy(p, p)) / (batch * seq)
        kls.append(jax.lax.stop_gradient(losses[-1] - entropy))
        pred = head.to_target_ids(jnp.argmax(logits, axis=-1))
        correct.append(jnp.sum((pred == shift_left(teacher.target_ids, i)) * lm))
        counted.append(jnp.sum(lm))
    losses = jnp.stack(losses)
    weights = decay ** jnp.arange(ttt_length, dtype=jnp.float32)
    correct, counted = jnp.stack(correct), jnp.stack(counted)
    metrics = {"loss": losses, "kl": jnp.stack(kls), "acc": correct / jnp.maximum(counted, 1e-6), "correct": correct,
               "counted": counted}
    return jnp.sum(weights * losses), metrics
