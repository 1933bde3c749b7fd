"""The demo corpus: the CPython standard library's own sources, tests excluded.

Every machine with Python has it, so the demo pair can be rebuilt anywhere
(the figures in docs/demo.md come from Python 3.11.7's library). Files are
split deterministically: a file whose path hashes to 0 modulo 20 is held out
(about 5%) and used neither to train the target nor the head, only to check
the shipped pair.
"""

from __future__ import annotations

import os
import sysconfig
import zlib

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
    """Relative paths of the library's .py files, sorted, without tests."""
    root = root or stdlib_dir()
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("test"))
        for name in files:
            if name.endswith(".py") and not name.startswith("test"):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def is_held_out(relpath: str) -> bool:
    return zlib.crc32(relpath.replace(os.sep, "/").encode()) % 20 == 0


def split(root: str | None = None) -> tuple[list[str], list[str]]:
    """(training files, held-out files) as absolute paths."""
    root = root or stdlib_dir()
    files = stdlib_files(root)
    train = [os.path.join(root, f) for f in files if not is_held_out(f)]
    held = [os.path.join(root, f) for f in files if is_held_out(f)]
    return train, held


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def export(out: str, which: str = "train") -> str:
    """Copies the training (or held-out) files into ``out``, for ``eagle3-jax train --data OUT``."""
    import shutil

    train, held = split()
    files = train if which == "train" else held
    root = stdlib_dir()
    for path in files:
        dst = os.path.join(out, os.path.relpath(path, root))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(path, dst)
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Copy the demo corpus's training or held-out files into a directory.")
    p.add_argument("--out", required=True)
    p.add_argument("--which", choices=["train", "heldout"], default="train")
    args = p.parse_args()
    print(export(args.out, args.which))
