"""Self-distillation data for the demo head: the target's own continuations of stdlib code.

    python tools/demo_assets/selfgen.py --target DIR --out FILE.jsonl [--samples 1536] [--prompt-tokens 64]
        [--new-tokens 96] [--batch 64] [--seed 0]

Prompts are random token windows of the corpus's training files; each line of
the output is ``{"text": prompt + greedy continuation}``, a plain-text
example for ``eagle3-jax train``. A head learns the target's distribution
best from the target's own outputs (what ``eagle3-jax regenerate`` does for
chat data).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from tqdm.auto import tqdm

from eagle3_jax.demo.corpus import read, split
from eagle3_jax.generation import Generator
from eagle3_jax.loading import load_target


def selfgen(target_dir: str, out: str, *, samples: int = 1536, prompt_tokens: int = 64, new_tokens: int = 96,
            batch: int = 64, seed: int = 0) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = load_target(target_dir, dtype="float32", progress=False)
    train_files, _ = split()
    docs = [tokenizer(read(f), add_special_tokens=False)["input_ids"] for f in train_files]
    docs = [d for d in docs if len(d) > prompt_tokens + 1]
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(samples):
        d = docs[rng.integers(len(docs))]
        s = int(rng.integers(0, len(d) - prompt_tokens))
        prompts.append(d[s:s + prompt_tokens])
    gen = Generator(target)
    with open(out, "w", encoding="utf-8") as f:
        for i in tqdm(range(0, samples, batch), desc="self-generating", unit="batch"):
            outs = gen.generate(prompts[i:i + batch], max_new_tokens=new_tokens)
            for p, o in zip(prompts[i:i + batch], outs):
                f.write(json.dumps({"text": tokenizer.decode(p + o.token_ids)}) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=1536)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(selfgen(args.target, args.out, samples=args.samples, prompt_tokens=args.prompt_tokens,
                  new_tokens=args.new_tokens, batch=args.batch, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
