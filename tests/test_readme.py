"""The README's code runs as written.

Every ```python block of README.md is either runnable offline (on the
embedded demo pair) or starts with a comment that says it needs the Hub (or
a running server).
The runnable blocks are executed in order, in one fresh interpreter sharing
one namespace (later blocks may use names of earlier ones), in an empty
working directory, with the Hub switched off. The others are only compiled.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NEEDS_HUB = re.compile(r"^#.*needs (the hub|a running server)", re.I)


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        blocks.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return blocks


def test_readme_has_runnable_python_blocks():
    blocks = python_blocks()
    assert blocks, "README.md has no python blocks"
    runnable = [b for b in blocks if not NEEDS_HUB.match(b[1].lstrip())]
    assert runnable, "no README python block runs offline"
    for line, code in blocks:
        compile(code, f"README.md:{line}", "exec")


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path):
    runnable = [(line, code) for line, code in python_blocks() if not NEEDS_HUB.match(code.lstrip())]
    script = textwrap.dedent("""
        import sys, traceback
        blocks = {blocks!r}
        namespace = {{"__name__": "__main__"}}
        for line, code in blocks:
            try:
                exec(compile(code, f"README.md:{{line}}", "exec"), namespace)
            except BaseException:
                traceback.print_exc()
                print(f"README block at line {{line}} failed", file=sys.stderr)
                sys.exit(1)
        print("README OK")
    """).format(blocks=runnable)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "README OK" in done.stdout


def test_readme_paths_exist():
    """Repository paths the README names in backticks exist (the layout table, docs, scripts)."""
    text = README.read_text(encoding="utf-8")
    missing = []
    for path in set(re.findall(r"`((?:eagle3_jax|docs|benchmarks|notebooks|convert|tests)/[\w./-]*)`", text)):
        if not (ROOT / path.rstrip("/")).exists():
            missing.append(path)
    links = re.findall(r"\]\(((?:docs|notebooks|benchmarks|LICENSE)[^)#\s]*)", text)
    missing += [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md names paths that do not exist: {sorted(missing)}"
