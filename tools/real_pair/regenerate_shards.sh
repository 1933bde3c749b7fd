#!/usr/bin/env bash
# Regenerates every prompt shard that has no output yet. Resumable: a shard's output appears only when
# complete, and within a shard `eagle3-jax regenerate --resume` continues from the last finished block,
# so a stopped run loses at most one block of --batch-size conversations.
#
#   tools/real_pair/regenerate_shards.sh TARGET PROMPTS_DIR OUT_DIR [extra eagle3-jax regenerate options]
#
# Defaults used for the SmolLM2 pair: 256 new tokens, batch 64, float32, greedy.
set -euo pipefail
target=$1 prompts=$2 out=$3
shift 3
mkdir -p "$out"
for f in "$prompts"/shard-*.jsonl; do
  name=$(basename "$f")
  [ -e "$out/$name" ] && continue
  start=$(date +%s)
  eagle3-jax regenerate --target "$target" --data "$f" --output "$out/$name.part" --overwrite --resume \
      --max-new-tokens 256 --batch-size 64 --dtype float32 "$@" 2>>"$out/regenerate.log"
  mv "$out/$name.part" "$out/$name"
  echo "$name $(( $(date +%s) - start )) s" >> "$out/times.txt"
done
