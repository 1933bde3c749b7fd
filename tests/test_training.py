"""Training EAGLE-3 heads: SpecForge's loss, data, vocabulary map, resume, data parallelism, CLI."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from eagle3_reference import make_reference_head, specforge_ttt_loss
from spec_helpers import tiny_target

from eagle3_jax import Generator, InputError, Qwen3Config, load_draft
from eagle3_jax.cli import main
from eagle3_jax.models.registry import read_target_config
from eagle3_jax.training.data import (
    Batcher,
    ChatEncoder,
    Example,
    buckets_for,
    encode_text,
    load_examples,
    read_conversations,
)
from eagle3_jax.training.offline import TeacherStore
from eagle3_jax.training.regenerate import regenerate
from eagle3_jax.training.run import new_head, set_vocab_map
from eagle3_jax.training.trainer import DraftParts, TrainConfig, Trainer, data_fingerprint
from eagle3_jax.training.ttt import teacher_from_logits, ttt_loss
from eagle3_jax.training.vocab import coverage, token_counts, vocab_map

TARGET = Qwen3Config(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=6,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=1e4)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ------------------------------------------------------------ the objective

@pytest.mark.slow
def test_loss_and_gradients_equal_specforge(tmp_path):
    ref, _ = make_reference_head(tmp_path, seed=2, rope_theta=1e4)
    head = load_draft(tmp_path, TARGET, dtype="float32", progress=False)
    rng = np.random.default_rng(0)
    b, t, ttt = 2, 9, 4
    tokens = rng.integers(0, 97, size=(b, t))
    feats = rng.normal(size=(b, t, 120)).astype(np.float32)
    logits = (rng.normal(size=(b, t, 97)) * 3).astype(np.float32)
    loss_mask = (rng.random((b, t)) > 0.3).astype(np.int32)
    loss_mask[:, -1] = 0
    valid = np.ones((b, t), bool)
    valid[1, 7:] = False
    loss_mask[1, 7:] = 0
    table = rng.normal(size=(97, 40)).astype(np.float32)

    parts = DraftParts(head)
    params, buffers = parts.initial
    d2t, t2d = jnp.asarray(buffers["d2t"]), jnp.asarray(buffers["t2d"])
    teacher = teacher_from_logits(jnp.asarray(tokens), jnp.asarray(feats), jnp.asarray(logits),
                                  jnp.asarray(loss_mask), jnp.asarray(valid), jnp.arange(31) + d2t, t2d)

    def loss_fn(p):
        return ttt_loss(parts.merge(p, buffers), teacher, lambda ids: jnp.asarray(table)[ids], ttt)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    r_total, r_losses, r_accs = specforge_ttt_loss(
        ref, torch.from_numpy(tokens), torch.from_numpy(feats), torch.from_numpy(logits), torch.from_numpy(loss_mask),
        torch.from_numpy(valid), torch.from_numpy(table), ttt)
    r_total.backward()
    assert rel_err(loss, r_total.item()) < 1e-5
    np.testing.assert_allclose(np.asarray(metrics["loss"]), [x.item() for x in r_losses], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics["acc"]), [x.item() for x in r_accs], rtol=1e-6)
    assert np.asarray(metrics["loss"]).min() > 0
    flat = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.__setitem__(prefix + k, np.asarray(v))

    walk(grads, "")
    for name, p in ref.named_parameters():
        linear = name.endswith(".weight") and ("proj" in name or name in ("fc.weight", "lm_head.weight"))
        ours = flat.pop(name[: -len("weight")] + "kernel") if linear else flat.pop(name)
        assert rel_err(ours.T if linear else ours, p.grad.numpy()) < 1e-4, name
    assert not flat  # every gradient was compared


def test_vocab_map_follows_specforge():
    counts = np.zeros(10, np.int64)
    counts[[7, 2, 5, 9]] = [5, 3, 3, 1]  # 2 and 5 tie: the lower id first
    d2t, t2d = vocab_map(counts, 3)
    used = np.arange(3) + d2t
    assert used.tolist() == [2, 5, 7] and d2t.dtype == np.int64
    assert t2d.tolist() == [i in (2, 5, 7) for i in range(10)]
    d2t, t2d = vocab_map(counts, 6)  # fewer distinct tokens than the draft vocabulary: lowest unused ids fill
    assert (np.arange(6) + d2t).tolist() == [0, 1, 2, 5, 7, 9]
    assert coverage(counts, t2d) == 1.0
    with pytest.raises(InputError):
        vocab_map(counts, 11)
    examples = [Example(np.array([1, 2, 2, 3]), np.array([0, 1, 1, 1])), Example(np.array([3]), np.array([1]))]
    assert token_counts(examples, 5).tolist() == [0, 0, 2, 2, 0]


# -------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def tokenizer(hf_qwen3_real_vocab):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_qwen3_real_vocab.path)


CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi there!"}, {"role": "user", "content": "Now count to three."},
        {"role": "assistant", "content": "One, two, three."}]


def test_chat_encoder_masks_the_assistant_replies(tokenizer):
    ex = ChatEncoder(tokenizer).encode(CONV, 512)
    masked = tokenizer.decode(ex.tokens[ex.loss_mask == 1])
    unmasked = tokenizer.decode(ex.tokens[ex.loss_mask == 0])
    assert "Hi there!" in masked and "One, two, three." in masked and masked.count("<|im_end|>") == 2
    for text in ("Be brief.", "Say hi.", "Now count to three.", "<|im_start|>assistant"):
        assert text in unmasked and text not in masked
    assert len(ex.tokens) == len(tokenizer(tokenizer.apply_chat_template(CONV, tokenize=False),
                                           add_special_tokens=False)["input_ids"])


def test_openai_and_sharegpt_files_agree(tmp_path, tokenizer):
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    (tmp_path / "a.jsonl").write_text(json.dumps({"messages": CONV}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(
        {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in CONV]}) + "\n")
    a = load_examples([str(tmp_path / "a.jsonl")], tokenizer, 256)
    b = load_examples([str(tmp_path / "b.jsonl")], tokenizer, 256)
    assert a[0].tokens.tolist() == b[0].tokens.tolist() and a[0].loss_mask.tolist() == b[0].loss_mask.tolist()
    long = load_examples([str(tmp_path / "a.jsonl")], tokenizer, 20)
    assert len(long[0].tokens) == 20


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "x"}', "expected a 'messages' (OpenAI) or 'conversations' (ShareGPT) list"),
    ('{"text": "x"}', "expected conversations, found plain 'text' records"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user"}]}', "turn 0 needs 'role' and 'content'"),
])
def test_bad_conversation_files(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises(InputError, match=re.escape(message)):
        read_conversations(str(tmp_path / "bad.jsonl"))


def test_text_files_train_on_every_token(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("def add(a, b):\n    return a + b\n" * 20)
    examples = load_examples([str(tmp_path / "a.txt")], tokenizer, 32)
    assert len(examples) > 2 and all(len(e.tokens) <= 32 and e.loss_mask.all() for e in examples)
    expected = len(tokenizer("def add(a, b):\n    return a + b\n" * 20)["input_ids"])
    assert sum(len(e.tokens) for e in examples) == expected
    assert len(encode_text(tokenizer, "x", 8)) == 0  # too short to predict anything


def test_batches_have_static_shapes_and_a_deterministic_order():
    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(0, 50, n), np.ones(n, np.int32)) for n in rng.integers(3, 200, 37)]
    b = Batcher(examples, batch_size=4, max_length=200, seed=3)
    assert b.buckets == [64, 128, 200]
    # four buckets per doubling past 256 tokens: a long sequence pads at most a fifth of its bucket
    assert buckets_for(1024) == [64, 128, 256, 320, 384, 448, 512, 640, 768, 896, 1024] and buckets_for(48) == [48]
    for epoch in range(2):
        plan = b.plan(epoch)
        assert plan == Batcher(examples, 4, 200, seed=3).plan(epoch)
        assert sorted(i for _, idx in plan for i in idx) == list(range(37))
        for pos in range(len(plan)):
            batch = b.batch(epoch, pos)
            assert batch.tokens.shape[0] == 4 and batch.tokens.shape[1] in b.buckets
            assert (batch.loss_mask <= batch.valid).all()
    assert b.plan(0) != b.plan(1)


# --------------------------------------------------------------- training

def greedy_data(target, n=16, prompt_len=5, new=27, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(6, 97, size=prompt_len).tolist() for _ in range(n)]
    outs = Generator(target).generate(prompts, max_new_tokens=new, stop_token_ids=())
    return [Example(np.array(p + o.token_ids, np.int32), np.array([0] * prompt_len + [1] * new, np.int32))
            for p, o in zip(prompts, outs)]


@pytest.fixture(scope="module")
def small_run():
    target = tiny_target(0)
    examples = greedy_data(target)
    return target, examples


def make_trainer(target, examples, workdir, *, steps=6, save_every=2, batch=4, lr=3e-3, mesh=None, store=None,
                 ttt=3):
    cfg = TrainConfig(ttt_length=ttt, learning_rate=lr, warmup_ratio=0.1, batch_size=batch, max_length=64,
                      max_steps=steps, seed=1, compute_dtype="float32", save_every=save_every, keep_checkpoints=2)
    head = new_head(target.config, 60, None, seed=1)
    set_vocab_map(head, *vocab_map(token_counts(examples, 97), 60))
    return Trainer(target, head, Batcher(examples, batch, 64, seed=1), cfg, str(workdir), mesh=mesh,
                   teacher_store=store)


@pytest.mark.slow
def test_loss_falls_and_accuracy_rises(small_run, tmp_path):
    target, examples = small_run
    trainer = make_trainer(target, examples, tmp_path, steps=80, save_every=1000, lr=1e-2, batch=8)
    history = trainer.run(progress=False, log_path=str(tmp_path / "m.jsonl"))
    first, last = history[:5], history[-5:]
    mean = lambda rows, key: float(np.mean([r[key] if key == "loss" else r[key][0] for r in rows]))
    # The soft-label loss has the teacher's entropy as its floor; what training removes is the KL part.
    assert mean(last, "loss") < mean(first, "loss")
    assert mean(last, "kl_steps") < 0.6 * mean(first, "kl_steps")
    assert mean(last, "acc_steps") > mean(first, "acc_steps") + 0.3
    rows = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert len(rows) == 80 and {"step", "loss", "loss_steps", "kl_steps", "acc_steps", "lr",
                                "tokens_per_second"} <= set(rows[0])
    assert len(rows[0]["acc_steps"]) == 3 and rows[0]["lr"] < rows[7]["lr"]


def _flat(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.mark.slow
def test_kill_and_resume_is_exact(small_run, tmp_path):
    target, examples = small_run
    straight = make_trainer(target, examples, tmp_path / "a")
    straight.run(progress=False)
    killed = make_trainer(target, examples, tmp_path / "b")
    log = str(tmp_path / "b.jsonl")
    killed.run(progress=False, stop_after=3, log_path=log)  # checkpoint at step 2; step 3 is lost with the process
    del killed
    resumed = make_trainer(target, examples, tmp_path / "b")
    assert resumed.restore_latest() and int(resumed.state.step) == 2 and resumed.position == (0, 2)
    resumed.run(progress=False, log_path=log)
    assert int(resumed.state.step) == 6
    # the log holds each step once: step 3 of the killed run is replaced by the resumed run's
    assert [json.loads(line)["step"] for line in open(log)] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(_flat(straight.state), _flat(resumed.state)):
        np.testing.assert_array_equal(a, b)
    # a resume with other data is refused
    other = make_trainer(target, examples[:-1], tmp_path / "b")
    with pytest.raises(InputError, match="other data or batching"):
        other.restore_latest()


@pytest.mark.slow
def test_precomputed_teacher_matches_online(small_run, tmp_path):
    target, examples = small_run
    online = make_trainer(target, examples, tmp_path / "on", steps=2, save_every=100)
    on_history = online.run(progress=False)
    store = TeacherStore.build(target, examples, str(tmp_path / "teacher"),
                               online.layers, data_fingerprint(online.batcher), 64, progress=False)
    offline = make_trainer(target, examples, tmp_path / "off", steps=2, save_every=100, store=store)
    off_history = offline.run(progress=False)
    for a, b in zip(on_history, off_history):
        np.testing.assert_allclose(a["loss_steps"], b["loss_steps"], rtol=1e-5)
        np.testing.assert_allclose(a["acc_steps"], b["acc_steps"], rtol=1e-6)
    # Adam divides each gradient by its own scale, so float noise in near-zero gradients shows up at
    # ~1e-3 of a learning-rate step (3e-3 here): compare parameters at that resolution.
    for a, b in zip(_flat(online.state.params), _flat(offline.state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


MULTI_DEVICE = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from test_training import greedy_data, make_trainer
    from spec_helpers import tiny_target
    from eagle3_jax.training.run import make_mesh
    assert len(jax.devices()) == 4
    target = tiny_target(0)
    examples = greedy_data(target)
    one = make_trainer(target, examples, {work!r} + "/one", steps=3, save_every=100)
    h1 = one.run(progress=False)
    # 2 data-parallel groups of 2 devices, the frozen target tensor-parallel within each
    four = make_trainer(target, examples, {work!r} + "/four", steps=3, save_every=100,
                        mesh=make_mesh(2, tensor_parallel=2))
    h4 = four.run(progress=False)
    shards = len(four._batch_sharding.addressable_devices)
    split = sum("tensor" in tuple(x.sharding.spec) for x in jax.tree.leaves(four.target_weights))
    diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(jax.device_get(one.state.params)),
                             jax.tree.leaves(jax.device_get(four.state.params)))]
    print(json.dumps({{"max_abs_diff": max(diffs), "devices": shards, "tensor_split": split,
                      "losses": [[r["loss_steps"] for r in h1], [r["loss_steps"] for r in h4]]}}))
""")


@pytest.mark.slow
def test_four_devices_with_a_sharded_target_equal_one(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    code = MULTI_DEVICE.format(tests=tests, work=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tests)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["tensor_split"] > 0
    one, four = result["losses"]
    np.testing.assert_allclose(four, one, rtol=1e-5)
    assert result["max_abs_diff"] < 1e-5  # float reduction order, amplified by Adam, at lr 3e-3


# ------------------------------------------------------------ CLI and regeneration

@pytest.mark.slow
def test_train_cli_end_to_end(hf_qwen3_real_vocab, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CONV}) for _ in range(3)) + "\n")
    text = tmp_path / "code.txt"
    text.write_text("for i in range(10):\n    print(i * i)\n" * 12)
    run = tmp_path / "run"
    argv = ["train", "--target", hf_qwen3_real_vocab.path, "--data", str(data), "--data", str(text), "--output",
            str(run), "--max-steps", "3", "--batch-size", "2", "--ttt-length", "2", "--max-length", "64",
            "--draft-vocab-size", "300", "--save-every", "2", "--feature-layers", "0,1,1", "--json"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # --json: one line per step as it happens, then the summary
    assert [line["event"] for line in lines] == ["step", "step", "step", "summary"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3
    for line, row in zip(lines, metrics):
        assert line == {"event": "step", "total_steps": 3, **row}
    summary = lines[-1]
    assert summary["finished"] and summary["steps"] == 3 and summary["draft_vocab_size"] == 300
    assert summary == {"event": "summary", **json.loads((run / "summary.json").read_text())}
    cfg = read_target_config(hf_qwen3_real_vocab.path, among=Qwen3Config.MODEL_TYPES)
    head = load_draft(run / "head", cfg, progress=False)
    assert head.config.draft_vocab_size == 300
    # the run directory is not reused by accident; --resume continues it
    assert main(argv) == 1 and "not empty (pass --resume" in capsys.readouterr().err
    argv[argv.index("--max-steps") + 1] = "4"
    assert main(argv + ["--resume"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["event"], line["step" if line["event"] == "step" else "steps"]) for line in lines] == [
        ("step", 4), ("summary", 4)]
    assert main(argv[:-1] + ["--resume", "--devices", "9"]) == 1
    assert "asked for 9 data-parallel x 1 tensor-parallel devices but 1 are available" in capsys.readouterr().err


@pytest.mark.slow
def test_regenerate_answers_with_the_target(hf_qwen3_real_vocab, tokenizer, tmp_path, capsys):
    from eagle3_jax import load_target

    target = load_target(hf_qwen3_real_vocab.path, dtype="float32", progress=False)
    convs = [CONV[1:], [{"role": "user", "content": "Only a question"}]]
    gen = Generator(target)
    out = regenerate(gen, tokenizer, convs, max_new_tokens=4, batch_size=2, progress=False)
    assert [m["role"] for m in out[0]] == ["user", "assistant", "user", "assistant"]
    assert [m["role"] for m in out[1]] == ["user", "assistant"]
    prompt = tokenizer(tokenizer.apply_chat_template(convs[1], tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    expected = gen.generate([prompt], max_new_tokens=4)[0].token_ids
    expected = [t for t in expected if t not in target.config.eos_token_ids]
    assert out[1][1]["content"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert out[0][1]["content"] != "Hi there!"  # replaced by the target's own reply
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"messages": c}) for c in convs) + "\n")
    dst = tmp_path / "out.jsonl"
    assert main(["regenerate", "--target", hf_qwen3_real_vocab.path, "--data", str(src), "--output", str(dst),
                 "--max-new-tokens", "4", "--dtype", "float32"]) == 0
    rows = [json.loads(line)["messages"] for line in dst.read_text().splitlines()]
    assert rows == out
    assert main(["regenerate", "--target", hf_qwen3_real_vocab.path, "--data", str(src), "--output", str(dst)]) == 1


def test_regenerate_progress_moves_with_the_tokens(tokenizer, monkeypatch):
    """The bar advances as tokens stream in within a batch, not once per batch (issue 11)."""
    import types

    from tqdm import tqdm

    import eagle3_jax.training.regenerate as regen

    eos = 151645
    seen = []

    class Bar(tqdm):
        def update(self, n=1):
            super().update(n)
            seen.append(round(self.n, 6))

    class Stub:
        config = types.SimpleNamespace(eos_token_ids=(eos,))
        calls = []

        def generate(self, prompts, *, max_new_tokens, stream=None, stream_every=4, **_):
            self.calls.append((len(prompts), stream is not None, stream_every))
            tokens = [[], []]
            for _ in range(max_new_tokens // 2):
                for row in range(len(prompts)):
                    if row == 1 and len(tokens[1]) == 2:
                        continue  # row 1 has stopped
                    new = [5, eos] if row == 1 else [5, 6]
                    tokens[row] += new
                    if stream is not None:
                        stream(row, new)
                seen.append("chunk")
            return [types.SimpleNamespace(token_ids=t, finish_reason="length") for t in tokens[:len(prompts)]]

    monkeypatch.setattr(regen, "tqdm", Bar)
    convs = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    out = regenerate(Stub(), tokenizer, convs, max_new_tokens=8, batch_size=2, stream_every=3)
    assert Stub.calls == [(2, True, 3)]
    # row 0 moves by a quarter reply a chunk; row 1 ended (a stop token) after its first chunk: one whole reply
    assert seen == [0.25, 1.25, "chunk", 1.5, "chunk", 1.75, "chunk", 2.0, "chunk"]
    assert [m["role"] for m in out[1]] == ["user", "assistant"]
    Stub.calls.clear()
    seen.clear()
    assert regenerate(Stub(), tokenizer, convs, max_new_tokens=8, batch_size=2, progress=False) == out
    assert "chunk" in seen and 0.25 not in seen  # no bar
    assert Stub.calls == [(2, False, 8)]


def test_directories_expand_to_their_files(tmp_path, tokenizer):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.py").write_text("import os\n" * 30)
    (tmp_path / "d" / "sub" / "b.jsonl").write_text(json.dumps({"text": "x = 1\n" * 10}) + "\n")
    (tmp_path / "d" / ".hidden").write_text("ignored")
    examples = load_examples([str(tmp_path / "d")], tokenizer, 256)
    assert len(examples) == 2 and all(e.loss_mask.all() for e in examples)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no files"):
        load_examples([str(tmp_path / "empty")], tokenizer, 64)


@pytest.mark.slow
def test_regenerate_resumes_exactly_after_a_stop(hf_qwen3_real_vocab, tmp_path, capsys, monkeypatch):
    """A run stopped after its first block, resumed with --resume, writes what an uninterrupted run writes;
    a resume with other settings or changed data is refused, and without --resume the progress is not lost."""
    import eagle3_jax.training.regenerate as regen

    convs = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(5)] + [CONV[1:]]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"messages": c}) for c in convs) + "\n")
    base = ["regenerate", "--target", hf_qwen3_real_vocab.path, "--data", str(src), "--max-new-tokens", "4",
            "--batch-size", "2", "--dtype", "float32", "--temperature", "1.0", "--seed", "7"]
    whole = tmp_path / "whole.jsonl"
    assert main(base + ["--output", str(whole)]) == 0
    assert not os.path.exists(str(whole) + ".progress")

    out = tmp_path / "out.jsonl"
    real = regen._regenerate_block
    calls = []

    def stop_after_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(kwargs["first"])
        return real(*args, **kwargs)

    monkeypatch.setattr(regen, "_regenerate_block", stop_after_first)
    assert main(base + ["--output", str(out)]) == 130
    assert not out.exists()
    lines = (tmp_path / "out.jsonl.progress").read_text().splitlines()
    assert len(lines) == 3 and [json.loads(x)["index"] for x in lines[1:]] == [0, 1]
    with open(tmp_path / "out.jsonl.progress", "a") as f:
        f.write('{"index": 2, "messa')  # a line a kill cut off
    monkeypatch.setattr(regen, "_regenerate_block", real)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # the progress is not silently discarded
        main(base + ["--output", str(out)])
    assert stop.value.code == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(base[:-1] + ["8", "--output", str(out), "--resume"]) == 1  # another seed
    assert "seed 7 -> 8" in capsys.readouterr().err
    resumed = []
    monkeypatch.setattr(regen, "_regenerate_block", lambda *a, **k: resumed.append(k["first"]) or real(*a, **k))
    assert main(base + ["--output", str(out), "--resume"]) == 0
    assert resumed == [2, 4] and "resuming: 2 of 6" in capsys.readouterr().err
    assert out.read_text() == whole.read_text()
    assert not os.path.exists(str(out) + ".progress")
