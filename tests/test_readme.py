"""The README's code runs as written, and so does the code of the docs pages that took over its reference.

Every ```python block of README.md and of the docs pages in DOC_PAGES is either
runnable offline (on the embedded demo pair) or starts with a comment that
says it needs the Hub (or a running server).
The runnable blocks of each file are executed in order, in one fresh
interpreter per file sharing one namespace (later blocks may use names of
earlier ones of the same file), in an empty working directory, with the Hub
switched off. The others are only compiled.

The links of the README and of the docs pages that hold its reference lead
somewhere: the repository paths they name exist, and so do the headings their
`#anchors` point to.
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
DOCS = ROOT / "docs"
# The docs pages that hold python blocks moved out of the README (the Hub and server examples).
DOC_PAGES = [DOCS / "python-api.md", DOCS / "serving.md", DOCS / "meshes-and-tpus.md"]
# The docs pages that hold the README's reference (its sections moved there), whose links are checked as its are.
REFERENCE_PAGES = [DOCS / f"{page}.md" for page in ("python-api", "cli", "serving", "meshes-and-tpus", "benchmarks",
                                                     "correctness", "layout", "notebooks")]
NEEDS_HUB = re.compile(r"^#.*needs (the hub|a running server)", re.I)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def python_blocks(page: pathlib.Path = README) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of a markdown file."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        blocks.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return blocks


def runnable_blocks(page: pathlib.Path) -> list[tuple[int, str]]:
    return [(line, code) for line, code in python_blocks(page) if not NEEDS_HUB.match(code.lstrip())]


def name(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


def run_blocks(page: pathlib.Path, cwd: pathlib.Path) -> None:
    """Runs the page's runnable blocks in order, in one fresh interpreter and one namespace."""
    script = textwrap.dedent("""
        import sys, traceback
        blocks = {blocks!r}
        namespace = {{"__name__": "__main__"}}
        for line, code in blocks:
            try:
                exec(compile(code, f"{name}:{{line}}", "exec"), namespace)
            except BaseException:
                traceback.print_exc()
                print(f"{name} block at line {{line}} failed", file=sys.stderr)
                sys.exit(1)
        print("{name} OK")
    """).format(blocks=runnable_blocks(page), name=name(page))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"{name(page)} OK" in done.stdout


def test_readme_has_runnable_python_blocks():
    blocks = python_blocks()
    assert blocks, "README.md has no python blocks"
    assert runnable_blocks(README), "no README python block runs offline"
    for line, code in blocks:
        compile(code, f"README.md:{line}", "exec")


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path):
    run_blocks(README, tmp_path)


def _doc_page_param(page: pathlib.Path):
    # A page with runnable blocks runs them (slow); one with only Hub or server blocks is compiled (quick).
    marks = [pytest.mark.slow] if page.exists() and runnable_blocks(page) else []
    return pytest.param(page, id=page.name, marks=marks)


@pytest.mark.parametrize("page", [_doc_page_param(page) for page in DOC_PAGES])
def test_docs_python_blocks(page, tmp_path):
    blocks = python_blocks(page)
    assert blocks, f"{name(page)} has no python blocks"
    for line, code in blocks:
        compile(code, f"{name(page)}:{line}", "exec")
    if runnable_blocks(page):
        run_blocks(page, tmp_path)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links and code marks dropped, lower case, punctuation dropped."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("page", [README, *REFERENCE_PAGES], ids=lambda p: name(p))
def test_readme_paths_exist(page):
    """Repository paths a page names in backticks exist (the layout table, docs, scripts), and so do the files
    and headings its links point to."""
    text = page.read_text(encoding="utf-8")
    missing = []
    for path in set(re.findall(r"`((?:eagle3_jax|docs|benchmarks|notebooks|convert|tests)/[\w./-]*)`", text)):
        if not (ROOT / path.rstrip("/")).exists():
            missing.append(path)
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", FENCE.sub("", text)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        linked = (page.parent / target).resolve() if target else page
        if not linked.exists():
            missing.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            missing.append(f"{target}#{anchor}")
    assert not missing, f"{name(page)} names paths or anchors that do not exist: {sorted(missing)}"
