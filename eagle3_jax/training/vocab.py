"""The draft vocabulary map from token frequencies (SpecForge's rule).

The ``draft_vocab_size`` most frequent target tokens over the loss-masked
training tokens, sorted ascending, form the draft vocabulary;
``d2t[i] = used[i] - i`` and ``t2d[t] = t in used``. Ties are broken by the
lower token id, and when the data has fewer distinct tokens than the draft
vocabulary, the lowest unused ids fill it (with count 0), as SpecForge does.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from eagle3_jax.errors import InputError


def token_counts(examples: Iterable, vocab_size: int) -> np.ndarray:
    """[vocab] int64 counts of the tokens under each example's loss mask."""
    counts = np.zeros(vocab_size, np.int64)
    for ex in examples:
        ids = np.asarray(ex.tokens)[np.asarray(ex.loss_mask) > 0]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise InputError(f"token ids outside the vocabulary [0, {vocab_size})")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def vocab_map(counts: np.ndarray, draft_vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(d2t [draft_vocab] int64, t2d [vocab] bool) from per-token counts."""
    vocab = counts.shape[0]
    if not 0 < draft_vocab_size <= vocab:
        raise InputError(f"draft_vocab_size must be in [1, {vocab}], got {draft_vocab_size}")
    order = np.lexsort((np.arange(vocab), -counts))  # count descending, then id ascending
    used = np.sort(order[:draft_vocab_size])
    d2t = (used - np.arange(draft_vocab_size)).astype(np.int64)
    t2d = np.zeros(vocab, bool)
    t2d[used] = True
    return d2t, t2d


def coverage(counts: np.ndarray, t2d: np.ndarray) -> float:
    """Fraction of the counted tokens that fall in the draft vocabulary."""
    total = counts.sum()
    return float(counts[t2d].sum() / total) if total else 0.0
