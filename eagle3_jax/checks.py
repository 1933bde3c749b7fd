"""Type and range checks at the Python API boundary.

Python coerces quietly (``int(1.7) == 1``, ``tuple("12") == ("1", "2")``,
``True == 1``), and a value that slips through reaches a compiled program as
silently wrong tokens. Every public entry point checks its arguments with
these helpers, which raise :class:`~eagle3_jax.errors.InputError` naming the
argument, never coerce a float or a string to an int, and never accept a bool
as a number.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from eagle3_jax.errors import InputError

# Seeds are folded into a 32-bit PRNG key (jax without x64): larger ones would alias smaller ones.
MAX_SEED = 2**32 - 1


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int, if it is an integer within [minimum, maximum]."""
    if not is_int(value):
        raise InputError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be at most {maximum}, got {value}")
    return value


def check_real(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
               open_minimum: bool = False) -> float:
    """``value`` as a finite float within its range (an int is fine, a bool or a string is not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if open_minimum else value < minimum):
        raise InputError(f"{name} must be {'>' if open_minimum else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_seed(value: Any, name: str = "seed") -> int:
    return check_int(name, value, minimum=0, maximum=MAX_SEED)


def check_token_ids(name: str, ids: Any, vocab_size: int, *, allow_empty: bool = False) -> list[int]:
    """A sequence of token ids in [0, vocab_size) as a list of ints.

    A string, a float, a bool or a nested list is refused, not coerced.
    """
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise InputError(f"{name} must be a 1-D sequence of integer token ids, got an array of shape "
                             f"{list(ids.shape)} and dtype {ids.dtype}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InputError(f"{name} must be a sequence of integer token ids, got {type(ids).__name__} {ids!r:.60}")
    bad = [t for t in ids if not is_int(t)]
    if bad:
        raise InputError(f"{name} must hold integer token ids, got {bad[0]!r} ({type(bad[0]).__name__})")
    out = [int(t) for t in ids]
    if not out and not allow_empty:
        raise InputError(f"{name} is empty")
    outside = [t for t in out if not 0 <= t < vocab_size]
    if outside:
        raise InputError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): {outside[:5]}")
    return out
