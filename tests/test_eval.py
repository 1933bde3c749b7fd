"""eagle3-jax eval: benchmark prompts (shipped slices, files, folders), acceptance-length table, JSON and PNG out."""

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from flax import nnx

from eagle3_jax import (
    Eagle3Config,
    Eagle3DraftHead,
    InputError,
    Qwen3Config,
    bench_prompts,
    save_draft,
)
from eagle3_jax.bench_prompts import (
    SHIPPED_DIR,
    find_benchmarks,
    load_benchmarks,
    read_benchmark_file,
)
from eagle3_jax.cli import main
from eagle3_jax.evaluation import (
    MethodRun,
    PromptOutput,
    RepeatTiming,
    _benchmark_row,
    figure_title,
    greedy_mismatches,
    markdown_table,
    model_name,
    panel_title,
    slim_results,
)
from eagle3_jax.models.registry import read_target_config

SHIPPED = ("gsm8k", "humaneval", "math500", "mtbench")
SLICES = pathlib.Path(SHIPPED_DIR)


@pytest.fixture(scope="module")
def head_dir(hf_qwen3_real_vocab, tmp_path_factory):
    cfg = read_target_config(hf_qwen3_real_vocab.path, among=Qwen3Config.MODEL_TYPES)
    head = Eagle3DraftHead(Eagle3Config.for_target(cfg, draft_vocab_size=cfg.vocab_size, feature_layers=(0, 1, 1)),
                           rngs=nnx.Rngs(0))
    return save_draft(head, tmp_path_factory.mktemp("eval") / "head")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(bench_prompts, "_probe", lambda *a: pytest.fail("offline mode must not touch the network"))


def test_shipped_slices_match_their_readme():
    readme = (SLICES / "README.md").read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| (\w+)\.jsonl \|.*`([0-9a-f]{64})` \|$", readme, re.MULTILINE))
    assert sorted(table) == sorted(SHIPPED)
    for name, digest in table.items():
        path = SLICES / f"{name}.jsonl"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
        prompts = read_benchmark_file(str(path))
        assert len(prompts) == 32 and all(len(p.turns) == (2 if name == "mtbench" else 1) for p in prompts)
        assert all(json.loads(line)["benchmark"] == name for line in path.read_text(encoding="utf-8").splitlines())
    shipped = sorted(os.listdir(SHIPPED_DIR))
    assert not any(n.startswith(("cmmlu", "ceval")) for n in shipped)  # CMMLU is non-commercial; C-Eval absent
    assert sum(os.path.getsize(os.path.join(SHIPPED_DIR, n)) for n in shipped if n.endswith(".jsonl")) < 150_000
    licences = (SLICES / "LICENSES.md").read_text(encoding="utf-8")
    for line in ("Copyright (c) 2021 OpenAI", "Copyright (c) OpenAI", "Copyright (c) 2021 Dan Hendrycks"):
        assert line in licences
    assert licences.count("The above copyright notice and this permission notice shall be included") == 3
    assert "Apache License" in (SLICES / "LICENSE-Apache-2.0.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("module, heavy", [("eagle3_jax.bench_prompts", "'jax', 'flax', 'numpy', 'transformers'"),
                                           ("eagle3_jax.cli.eval", "'jax', 'flax', 'transformers'")])
def test_prompt_loading_imports_nothing_heavy(module, heavy):
    code = f"import sys, {module}; print([m for m in ({heavy}) if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_eval_runs_offline_on_the_shipped_slices_and_names_the_skipped(hf_qwen3_real_vocab, head_dir, tmp_path,
                                                                       capsys, offline):
    out = tmp_path / "report"
    code = main(["eval", "--target", hf_qwen3_real_vocab.path, "--draft", head_dir, "--knobs", "2,1,3",
                 "--num-prompts", "2", "--max-new-tokens", "3", "--batch-size", "2", "--max-cache-len", "512",
                 "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    for name in ("ceval", "cmmlu"):
        assert f"warning: skipping {name}: " in err and f"--bench-file {name}=FILE" in err
    assert "pip install" not in err  # offline, installing datasets would not help
    results = json.loads((out / "results.json").read_text())
    assert list(results["benchmarks"]) == list(SHIPPED) and sorted(results["skipped"]) == ["ceval", "cmmlu"]
    assert "CC BY-NC-SA" in results["skipped"]["cmmlu"]
    for name in SHIPPED:
        assert results["sources"][name] == {"source": "shipped slice", "prompts": 2,
                                            "path": os.path.join(SHIPPED_DIR, f"{name}.jsonl")}
    table = (out / "results.md").read_text()
    assert "Skipped:" in table and "- ceval: " in table and "- gsm8k: 2 from shipped slice" in table
    assert (out / "accept_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    def last_two(path):
        return "/".join(pathlib.Path(path).resolve().parts[-2:])

    assert figure_title(results) == (f"Accept lengths. Target: {last_two(hf_qwen3_real_vocab.path)}; "
                                     f"draft: {last_two(head_dir)}")
    assert model_name("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"  # a Hub id as it is
    title = panel_title("gsm8k", "(2,1,3)", results["benchmarks"]["gsm8k"]["(2,1,3)"])
    assert title.startswith("gsm8k, tree (2,1,3): 2 prompts, acc. length ")


@pytest.mark.slow
def test_eval_fails_clearly_when_no_benchmark_has_prompts(hf_qwen3_real_vocab, head_dir, tmp_path, capsys, offline):
    code = main(["eval", "--target", hf_qwen3_real_vocab.path, "--draft", head_dir, "--bench", "ceval",
                 "--output", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 1
    assert "no benchmark has prompts" in err and "ceval: no local prompt file" in err
    assert "--bench-file ceval=FILE" in err and "pip install" not in err
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
def test_eval_speed_interleaves_and_records_the_tokens(hf_qwen3_real_vocab, head_dir, tmp_path, capsys, offline):
    bench = tmp_path / "bench"
    bench.mkdir()
    stub = 'def add_{}(x, y):\n    """Return the sum of x and y, checking first that both are integers."""\n'
    rows = [{"id": f"h{i}", "turns": [stub.format(i)]} for i in range(3)]  # the prompt bucket of mtbench's turn 1
    (bench / "humaneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    code = main(["eval", "--target", hf_qwen3_real_vocab.path, "--draft", head_dir, "--knobs", "2,1,3", "2,2,4",
                 "--bench", "humaneval", "mtbench", "ceval", "--bench-dir", str(bench), "--num-prompts", "2",
                 "--max-new-tokens", "5", "--batch-size", "2", "--max-cache-len", "512", "--speed", "--repeats", "2",
                 "--output", str(out),
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning: skipping ceval" in captured.err  # named explicitly, unavailable: skipped, not fatal
    assert "note: mtbench: " in captured.err and "using the shipped slice" in captured.err
    printed = json.loads(captured.out)
    results = json.loads((out / "results.json").read_text())
    assert results["knobs"] == ["(2,1,3)", "(2,2,4)"] and results["chat_template"] is True
    assert results["repeats"] == 2 and list(results["skipped"]) == ["ceval"]
    assert results["sources"]["humaneval"]["source"] == "--bench-dir"
    assert results["sources"]["mtbench"]["source"] == "shipped slice"
    for name, turns in (("humaneval", 1), ("mtbench", 2)):
        row = results["benchmarks"][name]
        plain = row["plain"]
        assert len(plain["repeat_seconds"]) == len(plain["repeat_tokens"]) == 2
        assert [len(o["token_ids"]) for o in plain["outputs"]] == [turns, turns]
        for knobs in results["knobs"]:
            r = row[knobs]
            assert r["prompts"] == 2 and r["verify_forwards"] == len(r["accept_lengths"]) > 0
            assert 1.0 <= r["acceptance_length"] <= 3.0
            assert r["acceptance_length"] == pytest.approx(sum(r["accept_lengths"]) / r["verify_forwards"])
            assert r["generated_tokens"] == sum(r["accept_lengths"]) + 2 * turns  # + the first token of each turn
            assert r["speedup_low"] <= r["speedup"] <= r["speedup_high"] and len(r["speedup_samples"]) == 2
            assert isinstance(r["speedup_noise"], bool) and "over 2 repeats" in r["speedup_text"]
            assert r["identical_to_plain"] is True and r["outputs"] == plain["outputs"]  # greedy: lossless
            assert r["repeats_identical"] is True and plain["repeats_identical"] is True
            slim = printed["benchmarks"][name][knobs]
            assert "accept_lengths" not in slim and "outputs" not in slim and slim["speedup"] == r["speedup"]
        assert "outputs" not in printed["benchmarks"][name]["plain"]
    table = (out / "results.md").read_text()
    assert "| humaneval |" in table and "| mtbench |" in table and "acc_length (2,2,4)" in table
    assert "(2,2,4) speedup" in table and "median of 2 interleaved repeats" in table
    assert "| yes |" in table or "| yes" in table
    assert printed["files"]["png"].endswith("accept_lengths.png")


def test_a_greedy_mismatch_is_recorded_and_reported(capsys):
    from eagle3_jax.cli.eval import report_mismatches

    def run(tokens):
        return MethodRun(acceptance_length=1.0, mean_per_prompt=1.0, verify_forwards=1, generated_tokens=3,
                         tokens_per_second=3.0, accept_lengths=(1,), prompts=1,
                         outputs=(PromptOutput(id="p", token_ids=tuple(map(tuple, tokens))),),
                         timing=RepeatTiming(tokens=(3, 3), seconds=(1.0, 1.0), identical=True))

    row = _benchmark_row({"plain": run([[1, 2, 3]]), "(2,1,3)": run([[1, 2, 3]]), "(2,2,4)": run([[1, 9, 3]])},
                         ["(2,1,3)", "(2,2,4)"], measure_plain=True, greedy=True).to_json()
    assert row["(2,1,3)"]["identical_to_plain"] is True and row["(2,2,4)"]["identical_to_plain"] is False
    assert row["(2,1,3)"]["speedup"] == 1.0 and row["(2,1,3)"]["speedup_noise"] is False
    results = {"knobs": ["(2,1,3)", "(2,2,4)"], "benchmarks": {"gsm8k": row}}
    assert greedy_mismatches(results) == ["gsm8k (2,2,4): prompt p turn 1 token 1"]
    assert "**NO** (a bug in float32)" in markdown_table({**results, "repeats": 2})
    assert report_mismatches(greedy_mismatches(results)) == 3
    assert "ERROR: greedy speculative decoding produced different tokens" in capsys.readouterr().err
    assert report_mismatches(greedy_mismatches(results), exact=False) == 0  # bfloat16: a near-tie may round apart
    assert "warning:" in capsys.readouterr().err
    sampled = _benchmark_row({"plain": run([[1]]), "(2,2,4)": run([[2]])}, ["(2,2,4)"], measure_plain=True,
                             greedy=False).to_json()
    assert sampled["(2,2,4)"]["identical_to_plain"] is None  # sampled outputs may differ
    assert "outputs" not in slim_results(results)["benchmarks"]["gsm8k"]["plain"]


def test_benchmark_sources_and_errors(tmp_path, offline):
    with pytest.raises(InputError, match="unknown benchmark 'mmlu'"):
        load_benchmarks(["mmlu"])
    with pytest.raises(InputError, match="no such file"):
        load_benchmarks(["gsm8k"], files={"gsm8k": str(tmp_path / "missing.jsonl")})
    with pytest.raises(InputError, match="--bench-dir is not a directory"):
        load_benchmarks(["gsm8k"], bench_dir=str(tmp_path / "nope"))
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(InputError, match="expected a JSON object with a 'turns' list"):
        load_benchmarks(["x"], files={"x": str(tmp_path / "bad.jsonl")})
    (tmp_path / "gsm8k.jsonl").write_text('{"id": "mine", "turns": ["2 + 2?"]}\n')
    (tmp_path / "cmmlu.jsonl").write_text('{"id": "c", "turns": ["问题\\n答案："]}\n')
    prompts = load_benchmarks(["gsm8k", "cmmlu", "math500"], bench_dir=str(tmp_path), limit=3)
    assert [p.id for p in prompts["gsm8k"]] == ["mine"] and prompts["cmmlu"][0].turns[0].endswith("答案：")
    assert len(prompts["math500"]) == 3  # not in the folder: the shipped slice
    found = find_benchmarks(["gsm8k"], files={"gsm8k": str(tmp_path / "cmmlu.jsonl")}, bench_dir=str(tmp_path))
    assert found.sources["gsm8k"]["source"] == "--bench-file" and found.prompts["gsm8k"][0].id == "c"
    with pytest.raises(InputError, match="no prompts for ceval: no local prompt file") as e:
        load_benchmarks(["ceval", "gsm8k"])
    assert "HF_HUB_OFFLINE=1" in str(e.value) and "pip install" not in str(e.value)
    assert list(load_benchmarks(["ceval", "gsm8k"], skip_unavailable=True)) == ["gsm8k"]
    with pytest.raises(InputError, match="no prompts for ceval"):
        load_benchmarks(["ceval"], skip_unavailable=True)
    notes = find_benchmarks(["humaneval"], limit=40).notes
    assert notes and "the shipped slice has 32 prompts, fewer than the 40 asked for" in notes[0]


def test_the_hub_check_is_cheap_and_says_what_helps(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    real_probe = bench_prompts._probe
    monkeypatch.setattr(bench_prompts, "_hub_state", {})
    probes = []
    monkeypatch.setattr(bench_prompts, "_probe", lambda *a: probes.append(a) or False)
    reason = find_benchmarks(["ceval", "cmmlu"]).skipped["ceval"]
    assert "huggingface.co can not be reached" in reason and "pip install" not in reason
    assert len(probes) == 1  # once per process, not per benchmark
    monkeypatch.setattr(bench_prompts, "_hub_state", {})
    monkeypatch.setattr(bench_prompts, "_probe", lambda *a: True)
    monkeypatch.setattr(bench_prompts.importlib.util, "find_spec", lambda name: None)
    assert "pip install datasets" in find_benchmarks(["ceval"]).skipped["ceval"]  # online: installing it helps
    assert real_probe("nonexistent.invalid", 0.5) is False  # bounded: a hanging name lookup can not hang it


def test_markdown_table_layout():
    results = {"knobs": ["(3,1,4)", "(7,10,60)"], "benchmarks": {
        "gsm8k": {"(3,1,4)": {"acceptance_length": 2.071}, "(7,10,60)": {"acceptance_length": 3.5}}}}
    assert markdown_table(results).splitlines() == [
        "| benchmark | acc_length (3,1,4) | acc_length (7,10,60) |", "| --- | --- | --- |", "| gsm8k | 2.07 | 3.50 |"]


def test_reports_are_never_overwritten_silently(tmp_path):
    from eagle3_jax.errors import CheckpointError
    from eagle3_jax.evaluation import check_report_destination, is_report, write_report

    results = {"knobs": ["(3,1,4)"], "benchmarks": {"x": {"(3,1,4)": {"acceptance_length": 2.0,
                                                                         "accept_lengths": [2, 2]}}}}
    out = tmp_path / "report"
    out.mkdir()  # an empty directory is a fine destination
    write_report(results, str(out))
    assert is_report(str(out)) and json.loads((out / "results.json").read_text())["format"] == "eagle3-jax/eval-report"
    with pytest.raises(CheckpointError, match="already exists"):
        check_report_destination(str(out))
    with pytest.raises(CheckpointError, match="already exists"):
        write_report(results, str(out))
    results["benchmarks"]["x"]["(3,1,4)"]["acceptance_length"] = 3.0
    write_report(results, str(out), overwrite=True)
    assert "3.00" in (out / "results.md").read_text()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not an output of eagle3-jax"):
        check_report_destination(str(mine), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "report"]
