"""Reading Hugging Face ``config.json`` files safely: :func:`read_json` and the typed key readers.

A config.json is untrusted input. Every key is read by one of these readers
(``json_int``, ``json_float``, ``json_bool``, ``json_ids``, ``json_mapping``),
shared by every parser in ``eagle3_jax/hf_config.py``, so that a value of the
wrong type or out of range is a :class:`ConfigError` naming the file and the
key, never a ``TypeError`` deep in model building. The rules:

* ``null`` is the same as an absent key: a required key (``default=REQUIRED``)
  is then missing, an optional one takes its default (as ``transformers``
  treats it).
* Integers must be JSON integers: ``true`` (a bool is an int in Python),
  ``256.0`` and ``"256"`` are refused, not coerced.
* Floats must be finite (Python's ``json`` accepts ``NaN`` and ``Infinity``).
* Booleans must be ``true`` or ``false`` (``"no"`` is not false).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from eagle3_jax.config import MAX_JSON_BYTES, MAX_TOKEN_ID, SIZE_LIMITS
from eagle3_jax.errors import ConfigError
from eagle3_jax.validation import describe, field_bool, field_fail, field_float, field_ids, field_int

REQUIRED = object()  # the ``default`` of a reader whose key must be present


def json_object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {describe(value)}")
    return value


def json_get(raw: Mapping[str, Any], key: str, where: str, default: Any) -> Any:
    """``raw[key]``; null counts as absent: ``default``, or an error if the key is required."""
    value = raw.get(key)
    if value is None and default is REQUIRED:
        raise ConfigError(f"{where}: missing required key(s): {key}")
    return value


def json_int(raw: Mapping[str, Any], key: str, where: str, *, lo: int = 1, hi: int | None = None,
         default: Any = REQUIRED) -> Any:
    """An integer ``raw[key]`` in ``[lo, hi]`` (``hi`` defaults to the key's size limit)."""
    value = json_get(raw, key, where, default)
    if value is None:
        return default
    return field_int(value, key, lo, SIZE_LIMITS[key] if hi is None else hi, where)


def json_float(raw: Mapping[str, Any], key: str, where: str, lo: float, hi: float, *, lo_open: bool = True,
           hi_open: bool = False, default: Any = REQUIRED) -> Any:
    value = json_get(raw, key, where, default)
    if value is None:
        return default
    return field_float(value, key, lo, hi, lo_open=lo_open, hi_open=hi_open, where=where)


def json_bool(raw: Mapping[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = raw.get(key)
    return default if value is None else field_bool(value, key, where)


def json_ids(raw: Mapping[str, Any], key: str, where: str, *, name: str | None = None, lo: int = 0,
         hi: int = MAX_TOKEN_ID) -> tuple[int, ...]:
    """Token ids (or layer ids): an int or a list of ints; null or absent is ()."""
    return field_ids(raw.get(key), name or key, where, lo=lo, hi=hi)


def json_id(raw: Mapping[str, Any], key: str, where: str) -> int | None:
    """One token id, or None."""
    value = raw.get(key)
    return None if value is None else field_int(value, key, 0, MAX_TOKEN_ID, where)


def json_mapping(raw: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any] | None:
    """A JSON object ``raw[key]``, or None if it is null or absent."""
    value = raw.get(key)
    if value is not None and not isinstance(value, Mapping):
        field_fail(where, key, "a JSON object", value)
    return value


def json_require(raw: Mapping[str, Any], where: str, keys: Iterable[str]) -> None:
    missing = [k for k in keys if raw.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a JSON object from ``path``; a missing, unreadable or broken file is a ConfigError naming it."""
    path = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: can not be read ({e.strerror or e})") from None
    if len(data) > MAX_JSON_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB, which is not a config file")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is tolerated
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text: {e})") from None
    if not text.strip():
        raise ConfigError(f"{path}: not valid JSON (the file is empty)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except ValueError:  # an integer literal longer than Python's int parsing limit (4300 digits)
        raise ConfigError(f"{path}: not valid JSON (a number with too many digits)") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {describe(obj)}")
    return obj

