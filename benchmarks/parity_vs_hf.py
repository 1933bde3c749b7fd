#!/usr/bin/env python
"""Numerical parity of the Flax target with HF transformers (float32, CPU).

For several random configs (built with transformers, saved, loaded by
eagle3-jax) this measures the max abs and max relative error of the logits of
a full forward, of the logits of the same tokens decoded one by one through the
KV cache, and whether greedy generation matches HF ``generate`` token for
token. Prints a table and writes JSON.

    python benchmarks/parity_vs_hf.py --out bench_out/parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from eagle3_jax import Generator, KVCache, load_target
from eagle3_jax.attention import AttentionMetadata

CONFIGS = {
    "qwen3-tiny-odd (untied, head_dim 12)": ("qwen3", dict(vocab_size=97, hidden_size=40, intermediate_size=56,
                                                           num_hidden_layers=4, num_attention_heads=4,
                                                           num_key_value_heads=2, head_dim=12)),
    "qwen3-tiny-tied": ("qwen3", dict(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                      tie_word_embeddings=True)),
    "qwen2-tiny (qkv bias)": ("qwen2", dict(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2)),
    "qwen3-small (8 layers, hidden 256, vocab 4096)": ("qwen3", dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)),
    # Llama 3.1-style: llama3 RoPE scaling (original context shrunk to 16 so that it acts on these positions)
    "llama3-tiny (llama3 rope, untied)": ("llama", dict(
        vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, rope_theta=5e5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "llama-tiny (attention bias, tied)": ("llama", dict(
        vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True)),
    "llama3-small (8 layers, hidden 256, vocab 4096)": ("llama", dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, rope_theta=5e5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
}
CLASSES = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}


def measure(kind, kwargs, seq=24, new_tokens=32, seed=0):
    torch.manual_seed(seed)
    common = dict(max_position_embeddings=1024, rope_theta=1e6, initializer_range=0.1, tie_word_embeddings=False)
    common.update(kwargs)
    cls_cfg, cls_model = CLASSES[kind]
    hf = cls_model(cls_cfg(**common)).eval()
    with torch.no_grad():  # HF initialises biases to zero; make them matter
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    hf.config._attn_implementation = "eager"
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = load_target(d, dtype="float32", progress=False)
    ids = np.random.default_rng(seed).integers(0, common["vocab_size"], size=(2, seq))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy().astype(np.float64)

    c = model.config
    cap = 64
    cache = KVCache.create(num_layers=c.num_hidden_layers, batch=2, capacity=cap, kv_heads=c.num_key_value_heads,
                           head_dim=c.head_dim, dtype=jnp.float32)
    zeros = jnp.zeros(2, jnp.int32)
    full = model(jnp.asarray(ids, jnp.int32), cache, AttentionMetadata.causal(zeros, seq))
    full = np.asarray(full.logits, np.float64)

    half = seq // 2
    out = model(jnp.asarray(ids[:, :half], jnp.int32), cache, AttentionMetadata.causal(zeros, half))
    steps = [np.asarray(out.logits)]
    cache = out.cache.with_lengths(jnp.full((2,), half, jnp.int32))
    for t in range(half, seq):
        lengths = cache.lengths
        out = model(jnp.asarray(ids[:, t:t + 1], jnp.int32), cache, AttentionMetadata.causal(lengths, 1))
        cache = out.cache.with_lengths(lengths + 1)
        steps.append(np.asarray(out.logits))
    incremental = np.concatenate(steps, axis=1).astype(np.float64)

    prompts = [ids[0, :5].tolist(), ids[1, :17].tolist()]
    ours = Generator(model).generate(prompts, max_new_tokens=new_tokens, stop_token_ids=())
    hf.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0)
    same = []
    for prompt, o in zip(prompts, ours):
        with torch.no_grad():
            g = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        same.append(g[0, len(prompt):].tolist() == o.token_ids)
    scale = np.abs(ref).max()
    return {
        "logits_max_abs_err": float(np.abs(full - ref).max()),
        "logits_max_rel_err": float(np.abs(full - ref).max() / scale),
        "cached_decode_max_abs_err": float(np.abs(incremental - ref).max()),
        "cached_decode_max_rel_err": float(np.abs(incremental - ref).max() / scale),
        "greedy_tokens_identical": all(same),
        "greedy_tokens_compared": new_tokens * len(prompts),
    }


def measure_draft(steps=4, seed=0):
    """The Flax draft head against the PyTorch reference in tests/eagle3_reference.py."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from eagle3_reference import make_reference_head

    from eagle3_jax import Qwen3Config, load_draft

    target = Qwen3Config(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=1e4)
    with tempfile.TemporaryDirectory() as d:
        ref, _ = make_reference_head(d, seed=seed)
        head = load_draft(d, target, dtype="float32", progress=False)
    rng = np.random.default_rng(seed)
    b, t = 2, 9
    feats = rng.normal(size=(b, t, 120)).astype(np.float32)
    embs = rng.normal(size=(b, t + steps, 40)).astype(np.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = KVCache.create(num_layers=1, batch=b, capacity=32, kv_heads=2, head_dim=12, dtype=jnp.float32)
    out = head(jnp.asarray(embs[:, :t]), jnp.asarray(feats), cache,
               AttentionMetadata.causal(jnp.zeros(b, jnp.int32), t), hidden_is_features=True)
    with torch.no_grad():
        empty = torch.zeros(b, 4, 0, 12)
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool))[None].expand(b, t, t)
        r_logits, r_g, keys, values = ref(torch.from_numpy(embs[:, :t]), torch.from_numpy(feats),
                                          torch.from_numpy(np.array(pos)), empty, empty, causal, True)
    errs = {"extend": (np.asarray(out.logits, np.float64), r_logits.numpy().astype(np.float64))}
    cache = out.cache.with_lengths(jnp.full((b,), t, jnp.int32))
    g, r = out.hidden[:, -1:], r_g[:, -1:]
    ours_steps, ref_steps = [], []
    for s in range(steps):
        lengths = cache.lengths
        out = head(jnp.asarray(embs[:, t + s: t + s + 1]), g, cache, AttentionMetadata.causal(lengths, 1),
                   hidden_is_features=False)
        with torch.no_grad():
            r_logits, r, keys, values = ref(torch.from_numpy(embs[:, t + s: t + s + 1]), r,
                                            torch.full((b, 1), t + s), keys, values,
                                            torch.ones(b, 1, t + s + 1, dtype=torch.bool), False)
        ours_steps.append(np.asarray(out.logits, np.float64))
        ref_steps.append(r_logits.numpy().astype(np.float64))
        cache, g = out.cache.with_lengths(lengths + 1), out.hidden
    errs[f"{steps} drafting steps (g fed back)"] = (np.concatenate(ours_steps, 1), np.concatenate(ref_steps, 1))
    return {k: {"max_abs_err": float(np.abs(a - r).max()), "max_rel_err": float(np.abs(a - r).max() / np.abs(r).max())}
            for k, (a, r) in errs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    rows = {}
    print(f"{'config':50s} {'logits abs':>11s} {'logits rel':>11s} {'cached rel':>11s} {'greedy = HF':>12s}")
    for name, (kind, kwargs) in CONFIGS.items():
        r = measure(kind, kwargs)
        rows[name] = r
        print(f"{name:50s} {r['logits_max_abs_err']:11.2e} {r['logits_max_rel_err']:11.2e} "
              f"{r['cached_decode_max_rel_err']:11.2e} {str(r['greedy_tokens_identical']):>12s}")
    draft = measure_draft()
    print(f"\n{'EAGLE-3 draft head vs PyTorch reference':50s} {'abs':>11s} {'rel':>11s}")
    for name, r in draft.items():
        print(f"{name:50s} {r['max_abs_err']:11.2e} {r['max_rel_err']:11.2e}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "transformers": transformers.__version__, "results": rows,
                       "draft_head": draft}, f,
                      indent=2)
    return 0 if all(r["greedy_tokens_identical"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
