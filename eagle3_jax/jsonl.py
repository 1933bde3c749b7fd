"""Reading JSONL files with errors that name the file and line."""

from __future__ import annotations

import json
from typing import Iterator

from eagle3_jax.errors import InputError


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yields (line number, object) for every non-blank line; bad JSON or a non-object is an InputError."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path}:{n}: expected a JSON object")
                yield n, record
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
