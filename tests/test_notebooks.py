"""The Colab notebooks run top to bottom, offline, on the embedded demo pair (small sizes)."""

import glob
import json
import os
import time

import pytest
from conftest import SHARED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
TIMINGS = os.path.join(ROOT, ".pytest_cache", "notebook_seconds.json")


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
def test_notebook_runs_on_the_demo_pair(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for key, value in {"EAGLE3_JAX_DEMO": "1", "EAGLE3_JAX_SMALL": "1", "EAGLE3_JAX_MAX_NEW_TOKENS": "32",
                       "EAGLE3_JAX_BENCH_DIR": str(SHARED / "data" / "bench"), "HF_HUB_OFFLINE": "1",
                       "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(key, value)
    book = nbformat.read(path, as_version=4)
    client = NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.time()
    client.execute()
    seconds = time.time() - t0
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    os.makedirs(os.path.dirname(TIMINGS), exist_ok=True)
    timings = json.load(open(TIMINGS)) if os.path.exists(TIMINGS) else {}
    timings[os.path.basename(path)] = round(seconds, 1)
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
    assert accelerator().startswith("cpu: ")
