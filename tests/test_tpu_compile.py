"""Programs compiled for TPU chips by the real TPU compiler, on this CPU (docs/architecture.md#ahead-of-time).

libtpu (installed by the test extra: ``jax[tpu]``) compiles for abstract TPU devices from
``jax.experimental.topologies``; nothing runs on a TPU. Checked here, with small shapes:

* the plain and speculative loops, with the Pallas TPU attention kernel that ``auto`` picks there,
  update the KV caches in place on TPU: no instruction copies,
  transposes, gathers or slices a cache-sized buffer, and the loop's temporaries stay below one
  layer's buffer (the TPU compiler used to copy every cache into and out of the loop, in another
  layout);
* ``eagle3-jax compile`` reports every program per chip, on one chip and on a mesh, in JSON, and
  refuses bad input with a clear message;
* on CPU, the TPU's way of reaching a row's window (one block per row, ``kv_cache.ROW_ACCESS``)
  gives the same tokens as the batched way, windows clamped at the end of the buffer included.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eagle3_jax import Eagle3Config, Eagle3DraftHead, Qwen3Config, Qwen3ForCausalLM, kv_cache
from eagle3_jax.decoding import plain, speculative
from eagle3_jax.decoding.common import DecodeSettings, RuntimeParams
from eagle3_jax.decoding.tree import TreeSpec
from eagle3_jax.platform import compiling_for, target_platform


def _has_libtpu() -> bool:
    """Whether libtpu is installed (looked up, not loaded: collection must not start it)."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


needs_libtpu = pytest.mark.skipif(not _has_libtpu(), reason="libtpu is not installed (pip install 'jax[tpu]')")

# TPU-shaped heads (8 KV heads of 128), everything else small.
CFG = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e4,
                  max_position_embeddings=8192)
CAPACITY = 4096


def _tpu_loop(mode: str, spec: TreeSpec | None, batch: int):
    from jax.sharding import SingleDeviceSharding

    from eagle3_jax.aot import topology

    place = SingleDeviceSharding(topology("v5e:1x1").devices[0])

    def placed(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place), tree)

    dtype = jnp.bfloat16
    tg, tw = nnx.split(nnx.eval_shape(lambda: Qwen3ForCausalLM(CFG, dtype=dtype, rngs=nnx.Rngs(0))))
    head = Eagle3Config.for_target(CFG, draft_vocab_size=256)
    dg, dw = nnx.split(nnx.eval_shape(lambda: Eagle3DraftHead(head, dtype=dtype, rngs=nnx.Rngs(1))))
    tw, dw = placed(tw), placed(dw)
    settings = DecodeSettings(max_new_tokens=256, capacity=CAPACITY, cache_dtype=jnp.dtype(dtype))
    params = RuntimeParams.make()
    prompt = placed((jax.ShapeDtypeStruct((batch, 64), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32),
                     jax.ShapeDtypeStruct((2,), jnp.uint32)))
    with compiling_for("tpu"):
        assert target_platform() == "tpu" and kv_cache.row_access() == "rows"
        if mode == "plain":
            state = placed(jax.eval_shape(lambda w, *a: plain.start(nnx.merge(tg, w), *a, params, settings), tw,
                                          *prompt))
            loop = jax.jit(lambda w, s: plain.decode_loop(nnx.merge(tg, w), s, params, settings),
                           donate_argnums=(1,))
            return loop.lower(tw, state).compile(), [state.cache]
        state = placed(jax.eval_shape(lambda w, d, *a: speculative.start(nnx.merge(tg, w), nnx.merge(dg, d), *a,
                                                                         params, settings, spec), tw, dw, *prompt))
        loop = jax.jit(lambda w, d, s: speculative.decode_loop(nnx.merge(tg, w), nnx.merge(dg, d), s, params,
                                                               settings, spec), donate_argnums=(2,))
        return loop.lower(tw, dw, state).compile(), [state.target_cache, state.draft_cache]


@needs_libtpu
@pytest.mark.parametrize("mode, spec, batch", [("plain", None, 1), ("plain", None, 4),
                                               ("speculative", TreeSpec(3, 1, 4), 1),
                                               ("speculative", TreeSpec(3, 4, 8), 4)],
                         ids=["plain-b1", "plain-b4", "chain-b1", "tree-b4"])
def test_tpu_loop_updates_the_caches_in_place(mode, spec, batch):
    compiled, caches = _tpu_loop(mode, spec, batch)
    text = compiled.as_text()
    assert "tpu_custom_call" in text  # 'auto' is the Pallas TPU kernel, compiled into the program
    capacities = {str(c.capacity) for c in caches}
    copies = [line.strip()[:200] for line in text.splitlines()
              if re.search(r"= \w+\[[0-9,]*\]\S* (copy|copy-start|transpose|gather|slice)\(", line)
              and capacities & set(re.search(r"\[([0-9,]*)\]", line).group(1).split(","))]
    assert not copies, "cache-sized copies in the TPU loop:\n" + "\n".join(copies)
    layer_bytes = min(c.k[0].size * c.k[0].dtype.itemsize for c in caches)
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < layer_bytes, f"the TPU loop's temporaries ({temp} bytes) hold a cache layer's buffer ({layer_bytes})"


def _config_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 512, "hidden_size": 256,
        "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "rope_theta": 10000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "eos_token_id": 2, "torch_dtype": "bfloat16"}))
    return str(tmp_path)


@needs_libtpu
def test_compile_command_reports_every_program(tmp_path, capsys):
    from eagle3_jax.cli import build_parser, main
    from eagle3_jax.cli.compile import PROGRAM_NAMES

    assert build_parser().parse_args(["compile"]).programs == list(PROGRAM_NAMES)  # every program by default
    code = main(["compile", "--config", _config_dir(tmp_path), "--topology", "v5e:1x1", "--cache", "1024",
                 "--batch", "2", "--draft-vocab", "256", "--json", "--no-compile-cache",
                 "--programs", "speculative-loop", "server-loop"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    names = [p["program"] for p in report["programs"]]
    assert names == ["speculative loop", "server loop"]
    assert report["setup"]["chip"] == "v5e" and report["setup"]["chip_memory_bytes"] == 16 << 30
    layer_cache = 2 * 8 * 1024 * 128 * 2  # one layer's K buffer: batch 2, 8 heads, 1024 slots, bfloat16
    for p in report["programs"]:
        assert p["error"] is None and p["fits"] is True
        assert p["argument_bytes"] > 0 and p["compile_seconds"] > 0
        assert p["total_bytes"] == p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"]
    loops = {p["program"]: p for p in report["programs"] if "loop" in p["program"]}
    for name in ("speculative loop", "server loop"):
        # the donated caches come back in place: the outputs alias the inputs' caches
        assert loops[name]["alias_bytes"] >= 2 * 4 * layer_cache
        assert loops[name]["temp_bytes"] < 8 * layer_cache  # less than the target's caches: none copied whole


@needs_libtpu
def test_compile_command_on_a_mesh(tmp_path, capsys):
    from eagle3_jax.cli import main

    args = ["compile", "--config", _config_dir(tmp_path), "--cache", "512", "--draft-vocab", "256", "--json",
            "--programs", "plain-loop", "--no-compile-cache", "--topology", "v5e:2x2"]
    assert main(args + ["--tensor-parallel", "2", "--data-parallel", "2", "--batch", "2"]) == 0
    sharded = json.loads(capsys.readouterr().out)["programs"][0]
    assert sharded["error"] is None and sharded["fits"] is True
    # per chip: the target's weights over two tensor shards, the caches over four (2 rows x 2 KV-head groups)
    model = nnx.eval_shape(lambda: Qwen3ForCausalLM(CFG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    weights = sum(x.size * 2 for x in jax.tree.leaves(nnx.state(model)))
    caches = 2 * 4 * 2 * 8 * 512 * 128 * 2  # K and V, 4 layers, batch 2, 8 KV heads, 512 slots, head 128, bfloat16
    assert sharded["argument_bytes"] < 0.6 * (weights + caches)


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v9x:1x1"], "unknown topology 'v9x:1x1'"),
    (["--topology", "cpu", "--tensor-parallel", "4"], "needs 4 chips; cpu has 1"),
    (["--preset", "qwen9"], "unknown preset 'qwen9'"),
])
def test_compile_command_refuses_bad_input(argv, message, capsys):
    from eagle3_jax.cli import main

    try:
        code = main(["compile", "--no-compile-cache", *argv])
    except SystemExit as e:  # a usage error: argparse's exit
        code = e.code
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and "Traceback" not in err


def test_compile_for_this_cpu(capsys):
    from eagle3_jax.aot import compile_report, topology

    small = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e4,
                        max_position_embeddings=1024)
    [report] = compile_report(small, topology("cpu"), dtype=jnp.float32, capacity=512, batch=1, draft_vocab=64,
                              programs=["plain loop"])
    assert report.error is None and report.fits is None  # the CPU's memory is not a chip's: no verdict
    assert report.alias_bytes > 0


# ------------------------------------------------------------------ the rows access, run on CPU

def _models():
    cfg = Qwen3Config(vocab_size=89, hidden_size=40, intermediate_size=56, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=12, rope_theta=1e4, max_position_embeddings=512,
                      eos_token_ids=(5,))
    target = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), init_std=0.2)
    head = Eagle3DraftHead(Eagle3Config.for_target(cfg, draft_vocab_size=89), rngs=nnx.Rngs(1))
    return target, head


def _generate(target, head, tokens, lengths, capacity, spec):
    settings = DecodeSettings(max_new_tokens=40, capacity=capacity)
    params = RuntimeParams.make()
    rng = jax.random.PRNGKey(0)
    if spec is None:
        fn = jax.jit(lambda t, n: plain.generate(target, t, n, rng, params, settings))
        out = fn(tokens, lengths)
    else:
        fn = jax.jit(lambda t, n: speculative.generate(target, head, t, n, rng, params, settings, spec).result)
        out = fn(tokens, lengths)
    return np.asarray(out.tokens), np.asarray(out.num_generated)


def test_rows_access_gives_the_batched_tokens(monkeypatch):
    """Rows of 5, 9 and 16 prompt tokens in a 32-slot cache: every row runs into the end of the buffer,
    where the rows access's blocks start early (clamped) and the verify and draft windows overhang it."""
    capacity = 32
    target, head = _models()
    rng = np.random.default_rng(0)
    lengths = np.array([5, 9, 16], np.int32)
    tokens = np.zeros((3, 16), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(6, 89, n)
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    results = {}
    for access in ("batched", "rows"):
        monkeypatch.setattr(kv_cache, "ROW_ACCESS", {"cpu": access})
        assert kv_cache.row_access() == access
        for name, spec in (("plain", None), ("tree", TreeSpec(3, 2, 6))):
            results[access, name] = _generate(target, head, tokens, lengths, capacity, spec)
    reference = results["batched", "plain"]
    assert (reference[1] == capacity - np.asarray(lengths)).all()  # every row was cut by the cache
    for key, (toks, counts) in results.items():
        np.testing.assert_array_equal(counts, reference[1], err_msg=str(key))
        for row, n in enumerate(counts):
            np.testing.assert_array_equal(toks[row, :n], reference[0][row, :n], err_msg=str(key))
