"""The Colab notebooks run top to bottom in demo mode: offline, on a demo pair, without ../shared.

Demo mode (``EAGLE3_JAX_DEMO=1``) is exactly what a user without the Hub gets:
the notebooks pick their own small sizes and read the benchmark slices
shipped in the package. Each notebook's time is printed (``pytest -s``) and
kept in ``.pytest_cache/notebook_seconds.json``; it is not asserted (the
machine's load moves it).
"""

import glob
import json
import os
import time

import pytest

from eagle3_jax.demo import resolve_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
TIMINGS = os.path.join(ROOT, ".pytest_cache", "notebook_seconds.json")
# Every switch a notebook reads; each must be documented in the notebook's first (markdown) cell.
SWITCHES = {"01_quickstart.ipynb": {"EAGLE3_JAX_DEMO"}, "02_train_a_head.ipynb": {"EAGLE3_JAX_DEMO"},
            "03_benchmarks.ipynb": {"EAGLE3_JAX_DEMO", "EAGLE3_JAX_BENCH_DIR"}}


def test_there_are_three_notebooks():
    assert [os.path.basename(p) for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_train_a_head.ipynb",
                                                       "03_benchmarks.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_notebook_has_no_outputs(path):
    import nbformat

    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_switches_are_documented(path):
    import re

    import nbformat

    book = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in book.cells if c.cell_type == "code")
    read = set(re.findall(r"EAGLE3_JAX_[A-Z_]+", code))
    assert read == SWITCHES[os.path.basename(path)]
    assert book.cells[0].cell_type == "markdown"
    for name in read:
        assert f"`{name}`" in book.cells[0].source, f"{name} is read but not documented in the first cell"


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for the three notebooks (they share the demo pair's programs)."""
    return str(tmp_path_factory.mktemp("jax-compile"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
@pytest.mark.slow
def test_notebook_runs_in_demo_mode(path, tmp_path, monkeypatch, compile_cache):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv("EAGLE3_JAX_BENCH_DIR", raising=False)  # the shipped slices, not a local folder
    for key, value in {"EAGLE3_JAX_DEMO": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg", "EAGLE3_JAX_COMPILE_CACHE": compile_cache}.items():
        monkeypatch.setenv(key, value)
    book = nbformat.read(path, as_version=4)
    # The working directory is a fresh folder: whatever the notebook writes (converted models, a run
    # directory) stays there, and nothing beside the repository (../shared) is in reach of a relative path.
    client = NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.time()
    client.execute()
    seconds = time.time() - t0
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "\n".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs)
    name = os.path.basename(path)
    # demo mode: the SmolLM2 pair where its wheel is installed (the toy pair for training, and without the wheel)
    pair = "toy" if name == "02_train_a_head.ipynb" else resolve_pair().name
    shown = {"toy": "eagle3_jax/demo/assets/target", "smollm2": "eagle3_jax/demo/assets/smollm2-head"}[pair]
    assert shown in text.replace(os.sep, "/"), f"not in demo mode on the {pair} pair"
    assert os.listdir(tmp_path) == [], "a notebook wrote into its working directory"
    print(f"\n{name}: {seconds:.1f} s in demo mode")
    os.makedirs(os.path.dirname(TIMINGS), exist_ok=True)
    timings = json.load(open(TIMINGS)) if os.path.exists(TIMINGS) else {}
    timings[name] = round(seconds, 1)
    json.dump(timings, open(TIMINGS, "w"), indent=1)


def test_notebook_helpers(monkeypatch):
    from eagle3_jax.demo import demo_paths
    from eagle3_jax.notebook import accelerator, pick_models, split_thinking

    assert split_thinking("<think>\nsteps\n</think>\n\n42") == ("steps", "42")
    assert split_thinking("just an answer ") == ("", "just an answer")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pick_models("org/t", "org/d", "auto") == (*demo_paths(), True)
    assert pick_models("org/t", "org/d", "0") == ("org/t", "org/d", False)
    assert pick_models("org/t", "org/d", True)[2] is True
    monkeypatch.setenv("EAGLE3_JAX_DEMO", "0")
    assert pick_models("org/t", "org/d") == ("org/t", "org/d", False)
    monkeypatch.setenv("EAGLE3_JAX_DEMO", "1")
    assert pick_models("org/t", "org/d") == (*demo_paths(), True)
    with pytest.raises(ValueError, match="EAGLE3_JAX_DEMO"):
        pick_models("org/t", "org/d", "maybe")
    assert accelerator().startswith("cpu: ")
