"""Reading JSONL files with errors that name the file and line."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator

from eagle3_jax.errors import InputError


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yields (line number, object) for every non-blank line.

    Only a regular file is read (a FIFO or a device would block or never
    end); a line that is not UTF-8, not strict JSON (NaN and Infinity are
    refused), too deeply nested, or not an object is an InputError naming the
    file and the line.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise InputError(f"{path}: {kind}; expected a JSONL file")
    n = 0
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line, parse_constant=_reject_constant)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                except (ValueError, RecursionError) as e:
                    reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
                    raise InputError(f"{path}:{n}: not valid JSON ({reason})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path}:{n}: expected a JSON object")
                yield n, record
    except UnicodeDecodeError:
        raise InputError(f"{path}:{n + 1}: not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
