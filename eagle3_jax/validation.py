"""Type and range checks: one toolkit for configs, the Python API, the CLI and the server.

Python coerces quietly (``int(1.7) == 1``, ``tuple("12") == ("1", "2")``,
``True == 1``), and a value that slips through reaches a compiled program as
silently wrong tokens. Every boundary checks its values with these helpers,
which never coerce a float or a string to an int and never accept a bool as a
number. Each boundary keeps its own error type and wording:

- **config fields** (``field_*``): a config dataclass or a ``config.json``
  key; :class:`~eagle3_jax.errors.ConfigError` naming the key and the file
  (``where``), with the JSON type of a wrong value ("got 1.5 (a float)").
- **arguments** (``check_*``): a Python API or CLI argument;
  :class:`~eagle3_jax.errors.InputError` naming the argument.
- **request fields**: the server's protocol (``serve/protocol.py``) reads a
  JSON body with its own ``APIError`` (an OpenAI error object) and wording,
  on the predicates here (:func:`is_int`) and :data:`MAX_SEED`.

This module imports nothing of the project but its errors.
"""

from __future__ import annotations

import math
import numbers
import operator
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import numpy as np

from eagle3_jax.errors import ConfigError, InputError

# Seeds are folded into a 32-bit PRNG key (jax without x64): larger ones would alias smaller ones.
MAX_SEED = 2**32 - 1

# ------------------------------------------------------------------ predicates and messages

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 6
_repr.maxlevel = 3


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_plain_int(value: Any) -> bool:
    """A Python int, not a bool (a config field: NumPy scalars are not hashable like ints in every case)."""
    return isinstance(value, int) and not isinstance(value, bool)


def show(value: Any) -> str:
    """A short repr for an error message, safe for huge or deeply nested values."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    try:
        return _repr.repr(value)
    except Exception:  # a pathological object (a repr that fails or recurses too deep)
        return f"<{type(value).__name__}>"


def json_type(value: Any) -> str | None:
    """The JSON type of ``value`` as a message names it ("a boolean", "an object"), or None for another type."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (str, "a string"), (float, "a float"), ((list, tuple), "a list"),
             (Mapping, "an object"))
    return next((k for t, k in kinds if isinstance(value, t)), None)


def describe(value: Any) -> str:
    """``value`` for an error message, with its JSON type where the repr could mislead."""
    if value is None:
        return "null"
    kind = json_type(value)
    return f"{show(value)} ({kind})" if kind else show(value)


# ------------------------------------------------------------------ config fields (ConfigError)

def field_fail(where: str | None, key: str, expected: str, value: Any) -> NoReturn:
    """Raises ConfigError: '<where>: <key> must be <expected>, got <value> (<its JSON type>)'."""
    prefix = f"{where}: " if where else ""
    raise ConfigError(f"{prefix}{key} must be {expected}, got {describe(value)}")


def _int_range(lo: int, hi: int) -> str:
    if lo == 1:
        return f"a positive integer (at most {hi})"
    if lo == 0:
        return f"a non-negative integer (at most {hi})"
    return f"an integer from {lo} to {hi}"


def field_int(value: Any, key: str, lo: int, hi: int, where: str | None = None) -> int:
    """``value`` if it is an int (not a bool, not a float) in ``[lo, hi]``."""
    if not is_plain_int(value) or not lo <= value <= hi:
        field_fail(where, key, _int_range(lo, hi), value)
    return int(value)


def field_float(value: Any, key: str, lo: float, hi: float, *, lo_open: bool = True, hi_open: bool = False,
                where: str | None = None) -> float:
    """``value`` as a float if it is a finite real number (not a bool) in the given range."""
    lo_text = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
    hi_text = f"less than {hi:g}" if hi_open else f"at most {hi:g}"
    expected = f"a finite number {lo_text} and {hi_text}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        field_fail(where, key, expected, value)
    try:
        x = float(value)
    except (OverflowError, ValueError, TypeError):
        field_fail(where, key, expected, value)
    if not math.isfinite(x) or (x <= lo if lo_open else x < lo) or (x >= hi if hi_open else x > hi):
        field_fail(where, key, expected, value)
    return x


def field_bool(value: Any, key: str, where: str | None = None) -> bool:
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        field_fail(where, key, "true or false", value)
    return value


def field_ids(value: Any, key: str, where: str | None = None, *, lo: int = 0, hi: int,
              scalar: bool = True) -> tuple[int, ...]:
    """A tuple of ints in ``[lo, hi]`` from a list (or, if ``scalar``, a single int); null is ()."""
    if value is None:
        return ()
    if scalar and is_plain_int(value) and lo <= value <= hi:
        return (int(value),)
    if isinstance(value, (list, tuple)) and all(is_plain_int(v) and lo <= v <= hi for v in value):
        return tuple(int(v) for v in value)
    what = "an int or a list of ints" if scalar else "a list of ints"
    field_fail(where, key, f"{what} from {lo} to {hi}", value)


def field_indices(values: Any, key: str, hi: int) -> tuple[int, ...]:
    """Indices from 0 to ``hi - 1`` given as any iterable of ints (NumPy ints too, not bools or a string)."""
    expected = f"a list of layer indices (integers from 0 to {hi - 1})"
    if isinstance(values, (str, bytes, Mapping)):
        field_fail(None, key, expected, values)
    try:
        items = list(values)
    except TypeError:
        field_fail(None, key, expected, values)
    out = []
    for i in items:
        try:
            index = None if isinstance(i, bool) else operator.index(i)
        except TypeError:
            index = None
        if index is None or not 0 <= index < hi:
            field_fail(None, key, expected, items)
        out.append(index)
    return tuple(out)


# ------------------------------------------------------------------ arguments (InputError)

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
    """A PRNG seed: an integer in [0, MAX_SEED]."""
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
