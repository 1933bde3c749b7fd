"""eagle3-jax eval: benchmark prompt files in, acceptance-length table, JSON and PNG out."""

import json

import pytest
from conftest import SHARED
from flax import nnx

from eagle3_jax import Eagle3Config, Eagle3DraftHead, InputError, Qwen3Config, save_draft
from eagle3_jax.cli import main
from eagle3_jax.evaluation import load_benchmarks, markdown_table

BENCH = SHARED / "data" / "bench"


@pytest.fixture(scope="module")
def head_dir(hf_qwen3_real_vocab, tmp_path_factory):
    cfg = Qwen3Config.from_pretrained(hf_qwen3_real_vocab.path)
    head = Eagle3DraftHead(Eagle3Config.for_target(cfg, draft_vocab_size=cfg.vocab_size, feature_layers=(0, 1, 1)),
                           rngs=nnx.Rngs(0))
    return save_draft(head, tmp_path_factory.mktemp("eval") / "head")


def test_eval_writes_the_table_json_and_histogram(hf_qwen3_real_vocab, head_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["eval", "--target", hf_qwen3_real_vocab.path, "--draft", head_dir, "--knobs", "2,1,3", "2,2,4",
                 "--bench", "humaneval", "mtbench", "--bench-dir", str(BENCH), "--num-prompts", "2",
                 "--max-new-tokens", "6", "--batch-size", "2", "--speed", "--output", str(out), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    results = json.loads((out / "results.json").read_text())
    assert results["knobs"] == ["(2,1,3)", "(2,2,4)"] and results["chat_template"] is True
    for name, turns in (("humaneval", 2), ("mtbench", 4)):
        row = results["benchmarks"][name]
        for knobs in results["knobs"]:
            r = row[knobs]
            assert r["prompts"] == 2 and r["verify_forwards"] == len(r["accept_lengths"]) > 0
            assert 1.0 <= r["acceptance_length"] <= 3.0
            assert r["acceptance_length"] == pytest.approx(sum(r["accept_lengths"]) / r["verify_forwards"])
            assert r["generated_tokens"] == sum(r["accept_lengths"]) + turns  # + the first token of each turn
            assert "speedup" in r
        assert row["plain"]["generated_tokens"] == row["(2,1,3)"]["generated_tokens"]
    table = (out / "results.md").read_text()
    assert "| humaneval |" in table and "| mtbench |" in table and "acc_length (2,2,4)" in table
    assert (out / "accept_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert printed["files"]["png"].endswith("accept_lengths.png")
    assert "accept_lengths" not in printed["benchmarks"]["humaneval"]["(2,1,3)"]


def test_benchmark_loading_errors(tmp_path):
    with pytest.raises(InputError, match="unknown benchmark 'mmlu'"):
        load_benchmarks(["mmlu"], bench_dir=str(BENCH))
    with pytest.raises(InputError, match="no such file"):
        load_benchmarks(["gsm8k"], files={"gsm8k": str(tmp_path / "missing.jsonl")})
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(InputError, match="expected a JSON object with a 'turns' list"):
        load_benchmarks(["x"], files={"x": str(tmp_path / "bad.jsonl")})
    prompts = load_benchmarks(["gsm8k", "cmmlu"], bench_dir=str(BENCH), limit=3)
    assert [len(v) for v in prompts.values()] == [3, 3]
    assert prompts["cmmlu"][0].turns[0].endswith("答案：")


def test_ceval_without_a_file_needs_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="ceval"):
        load_benchmarks(["ceval"], bench_dir=str(BENCH))


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
