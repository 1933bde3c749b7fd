"""Pretrain the demo target: a small Qwen3-architecture model of Python code.

    python tools/demo_assets/pretrain.py --tokenizer DIR --out DIR [--steps 3000] [--batch 16] [--seq 256]

The training files of the corpus (``eagle3_jax.demo.corpus``) are tokenized,
joined with ``<|endoftext|>`` and cut into random windows; the model is
trained with next-token cross-entropy (AdamW, warmup then cosine decay,
gradient clipping) and written in the HF format with its tokenizer, so that
``transformers`` loads it too. Prints a line of figures every 100 steps and
writes them to OUT/pretrain_log.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eagle3_jax.config import Qwen3Config
from eagle3_jax.demo.corpus import read, split
from eagle3_jax.loading import save_target
from eagle3_jax.models.qwen3 import Qwen3ForCausalLM

DEMO_TARGET = Qwen3Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=10000.0,
                          max_position_embeddings=2048, tie_word_embeddings=True, eos_token_ids=(0,), pad_token_id=0)


def token_stream(tokenizer, files) -> np.ndarray:
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = []
    for f in files:
        ids += tokenizer(read(f), add_special_tokens=False)["input_ids"] + [eos]
    return np.asarray(ids, np.int32)


def lm_loss(model, tokens):
    """Mean next-token cross-entropy of [batch, seq] tokens."""
    logits = model.forward_sequence(tokens).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def pretrain(tokenizer_dir: str, out: str, *, steps: int = 3000, batch: int = 16, seq: int = 256, lr: float = 3e-3,
             seed: int = 0, config: Qwen3Config = DEMO_TARGET, log_every: int = 100) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_files, held_files = split()
    train_ids = token_stream(tokenizer, train_files)
    held_ids = token_stream(tokenizer, held_files)
    model = Qwen3ForCausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=min(200, steps // 10), decay_steps=steps,
                                                  end_value=lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(nnx.merge(graphdef, p), tokens))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def evaluate(params, tokens):
        return lm_loss(nnx.merge(graphdef, params), tokens)

    rng = np.random.default_rng(seed)
    held_windows = np.stack([held_ids[i:i + seq] for i in range(0, len(held_ids) - seq, seq)][:64])
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "pretrain_log.jsonl")
    t0, losses = time.time(), []
    with open(log_path, "w", encoding="utf-8") as log:
        for i in range(1, steps + 1):
            starts = rng.integers(0, len(train_ids) - seq, size=batch)
            tokens = jnp.asarray(np.stack([train_ids[s:s + seq] for s in starts]))
            params, opt_state, loss = step(params, opt_state, tokens)
            losses.append(float(loss))
            if i % log_every == 0 or i == steps:
                held = float(evaluate(params, jnp.asarray(held_windows)))
                row = {"step": i, "train_loss": float(np.mean(losses[-log_every:])), "heldout_loss": held,
                       "lr": float(schedule(i)), "seconds": time.time() - t0}
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row), flush=True)
    model = nnx.merge(graphdef, params)
    target_dir = save_target(model, os.path.join(out, "target"), dtype="bfloat16", tokenizer_dir=tokenizer_dir,
                             overwrite=True)
    summary = {"train_tokens": int(len(train_ids)), "heldout_tokens": int(len(held_ids)), "steps": steps,
               "batch": batch, "seq": seq, "lr": lr, "config": dataclasses.asdict(config),
               "final_train_loss": float(np.mean(losses[-log_every:])), "seconds": time.time() - t0,
               "target": target_dir}
    with open(os.path.join(out, "pretrain_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="directory from tools/demo_assets/build_tokenizer.py")
    p.add_argument("--out", required=True, help="work directory; the model goes to OUT/target")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = pretrain(args.tokenizer, args.out, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr,
                       seed=args.seed)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
