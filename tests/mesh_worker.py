"""Runs generation on simulated CPU device meshes and prints what tests/test_mesh.py checks, as JSON.

Started by tests/test_mesh.py in a process of its own with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count is
fixed when JAX starts, and the rest of the suite runs on one device).
Everything is compared with one device inside this process, so the JSON
holds booleans and small figures, not tokens.

The demo pair (4 query heads, 2 KV heads, a trained head: long accepted runs)
covers data and tensor parallelism and the replicated-KV case (tensor 4 over
2 KV heads); a tiny random target with 8 KV heads covers tensor parallel 8.
The server's engine runs on a mesh too (``check_server``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings

import jax
import numpy as np
from flax import nnx

from eagle3_jax import Generator, Qwen3Config, Qwen3ForCausalLM, SamplingParams, load_draft, load_target
from eagle3_jax.config import Eagle3Config
from eagle3_jax.demo import demo_paths
from eagle3_jax.errors import InputError
from eagle3_jax.models.eagle3 import Eagle3DraftHead
from eagle3_jax.sharding import ShardingPlan, make_mesh
from eagle3_jax.weights.params import flat_params

TREES = {"plain": None, "chain": dict(num_steps=3, topk=1, num_draft_tokens=4),
         "tree": dict(num_steps=3, topk=4, num_draft_tokens=8),
         "sampled": dict(num_steps=3, topk=4, num_draft_tokens=8)}  # the tree, sampled (temperature 0.8, top-p 0.9)
SAMPLING = SamplingParams(temperature=0.8, top_p=0.9)
# (batch, decoding, (data, tensor) meshes of 2, 4 and 8 devices); the demo target's 2 KV heads are
# replicated at tensor 4. Each mesh compiles its own programs (seconds each on 2 cores): a spread, not all pairs.
DEMO_CASES = [
    (8, "plain", [(2, 4)]),
    (8, "chain", [(1, 2), (8, 1)]),
    (8, "tree", [(2, 2), (2, 4)]),
    (8, "sampled", [(2, 2)]),
    (1, "chain", [(1, 2)]),
    (1, "tree", [(2, 2)]),
]
NEW_TOKENS = 20


def prompts_of(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, vocab - 1, size=int(k)).tolist() for k in rng.integers(3, 30, size=n)]


def run(target, draft, tree: str, prompts, mesh=None) -> list[list[list[int]]]:
    knobs = TREES[tree] or {}
    gen = Generator(target, draft if knobs else None, max_cache_len=128, mesh=mesh, **knobs)
    sampling = {"sampling": SAMPLING, "seed": 5} if tree == "sampled" else {}
    outs = gen.generate(prompts, max_new_tokens=NEW_TOKENS, stop_token_ids=(), **sampling)
    return [[o.token_ids, o.accept_lengths] for o in outs]


def check_generation(target, draft, cases, name: str) -> dict:
    """``cases``: (batch, tree, [(data, tensor), ...]) -> for each mesh, whether its tokens and accept
    lengths equal one device's."""
    results = {}
    for batch, tree, meshes in cases:
        prompts = prompts_of(batch, target.config.vocab_size, seed=batch)
        alone = run(target, draft, tree, prompts)
        accepted = float(np.mean([np.mean(a) for _, a in alone]))
        for dp, tp in meshes:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sharded = run(target, draft, tree, prompts, make_mesh(tp, dp))
            results[f"{name} {dp}x{tp} {tree} b{batch}"] = {
                "identical": sharded == alone, "devices": dp * tp, "acceptance": accepted,
                "replicated_kv_warning": any("KV heads" in str(w.message) for w in caught),
                "seconds": round(time.perf_counter() - t0, 2)}
    return results


def check_loading(target_dir: str) -> dict:
    """A target loaded onto a mesh: every parameter on its table's shards, values as loaded whole;
    a converted checkpoint restored into the same shardings."""
    from eagle3_jax import convert_target

    mesh = make_mesh(2, 2)
    whole = flat_params(load_target(target_dir, progress=False))
    plan = ShardingPlan.for_target(mesh, load_target(target_dir, progress=False).config)
    shardings = plan.param_shardings(load_target(target_dir, progress=False))
    assert set(shardings) == set(whole)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        converted = convert_target(target_dir, os.path.join(tmp, "conv"), dtype="float32", progress=False)
        for kind, path in (("safetensors", target_dir), ("converted", converted)):
            placed = flat_params(load_target(path, progress=False, mesh=mesh))
            wrong = [p for p, v in placed.items()
                     if v[...].sharding != shardings[p]
                     or not np.array_equal(np.asarray(v[...]), np.asarray(whole[p][...]))]
            sharded = [p for p, v in placed.items() if any(a is not None for a in v[...].sharding.spec)]
            shard = placed["model.layers.0.mlp.gate_proj.kernel"][...]
            out[kind] = {"wrong": wrong, "sharded": len(sharded), "total": len(placed),
                         "gate_shard_shape": list(shard.addressable_shards[0].data.shape),
                         "gate_shape": list(shard.shape)}
    config = load_target(target_dir, progress=False).config
    try:
        ShardingPlan.for_target(make_mesh(3), config)
        refused = "not refused"
    except InputError as e:
        refused = str(e)
    notes = " ".join(ShardingPlan.for_target(make_mesh(4), config).notes)
    out["plan_errors"] = {"tensor 3": refused, "tensor 4": notes}
    return out


class ListSink:
    """A server request's sink that keeps its tokens and its end."""

    def __init__(self):
        import threading

        self.ids, self.reason, self.done = [], None, threading.Event()

    def tokens(self, ids):
        self.ids += ids
        return False

    def finish(self, reason, stats):
        self.reason, self.accept = reason, stats.accept_lengths
        self.done.set()


def serve_all(target, draft, requests, mesh=None) -> list:
    """The server's engine (continuous batching, 2 rows, chunks of 2 cycles) on ``mesh``: each request's
    (tokens, finish reason, accept lengths)."""
    from eagle3_jax.serve.engine import BatchEngine, EngineRequest

    gen = Generator(target, draft, **TREES["tree"], max_cache_len=128, mesh=mesh, tokenizer=False)
    engine = BatchEngine(gen, max_batch=2, max_cache_len=128, chunk=2)
    engine.start()
    sinks = []
    try:
        for prompt, temperature, seed in requests:
            sinks.append(ListSink())
            engine.submit(EngineRequest(prompt=prompt, max_tokens=NEW_TOKENS, sink=sinks[-1], temperature=temperature,
                                        top_p=0.9, seed=seed))
        for sink in sinks:
            assert sink.done.wait(600), "a request did not finish"
    finally:
        engine.stop()
    assert engine.error is None, engine.error
    return [[sink.ids, sink.reason, sink.accept] for sink in sinks]


def check_server(target, draft) -> dict:
    """The server's engine on a data 2 x tensor 2 mesh (two rows, four greedy requests: two are admitted as rows
    free up): each request's tokens equal Generator.generate's on one device. Prompts of one bucket, to compile
    few programs."""
    prompts = [p[:12] for p in prompts_of(4, target.config.vocab_size, seed=11)]
    t0 = time.perf_counter()
    meshed = serve_all(target, draft, [(p, 0.0, i) for i, p in enumerate(prompts)], make_mesh(2, 2))
    alone = run(target, draft, "tree", prompts)
    return {"identical": [o[0] for o in meshed] == [a[0] for a in alone], "reasons": sorted({o[1] for o in meshed}),
            "seconds": round(time.perf_counter() - t0, 2)}


def tiny_eight_heads():
    cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=8, rope_theta=1e4,
                      max_position_embeddings=256, eos_token_ids=(0,))
    target = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), init_std=0.3)
    head = Eagle3DraftHead(Eagle3Config.for_target(cfg), rngs=nnx.Rngs(1))
    return target, head


def main() -> None:
    assert len(jax.devices()) == 8, jax.devices()
    tdir, hdir = demo_paths("toy")
    target = load_target(tdir, dtype="float32", progress=False)
    draft = load_draft(hdir, target.config, dtype="float32", progress=False)
    results = {"devices": len(jax.devices())}
    results.update(check_generation(target, draft, DEMO_CASES, "demo"))
    tiny, tiny_head = tiny_eight_heads()
    results.update(check_generation(tiny, tiny_head, [(8, "plain", [(1, 8)]), (8, "tree", [(1, 8)])], "tiny8"))
    results["loading"] = check_loading(tdir)
    results["server"] = check_server(target, draft)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
