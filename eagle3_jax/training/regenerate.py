"""Regenerating training answers with the target itself.

A head learns the target's own distribution best from the target's own
outputs (this matters most for thinking models, whose traces no dataset
holds). For every conversation the user (and system) turns are kept and
each assistant turn is replaced by the target's reply to the conversation
so far; conversations that end with a user turn get one reply appended.
Replies are generated in batches, turn by turn, with :class:`Generator`.
"""

from __future__ import annotations

import json
from typing import Sequence

from tqdm.auto import tqdm

from eagle3_jax.generation import Generator, require_finite
from eagle3_jax.sampling import SamplingParams
from eagle3_jax.text import render_chat, token_ids


def _turn_plan(conversation: Sequence[dict]) -> tuple[list[dict], int]:
    """(the non-assistant turns in order, number of replies to generate)."""
    kept = [m for m in conversation if m["role"] != "assistant"]
    replies = sum(1 for m in conversation if m["role"] == "assistant")
    if conversation[-1]["role"] != "assistant":
        replies += 1
    return kept, replies


def regenerate(generator: Generator, tokenizer, conversations: Sequence[Sequence[dict]], *, max_new_tokens: int,
               sampling: SamplingParams | None = None, batch_size: int = 8, seed: int = 0,
               progress: bool = True) -> list[list[dict]]:
    """Returns the conversations with every assistant turn written by the target."""
    sampling = sampling or SamplingParams()
    stop_ids = generator.config.eos_token_ids
    state = [([], list(conv)) for conv in conversations]  # (messages so far, source turns left)
    pending = list(range(len(conversations)))
    total = sum(_turn_plan(c)[1] for c in conversations)
    bar = tqdm(total=total, desc="regenerating", unit="reply", disable=not progress)
    while pending:
        prompts, rows = [], []
        for i in pending:
            messages, rest = state[i]
            while rest and rest[0]["role"] != "assistant":
                messages.append(rest.pop(0))
            if rest:
                rest.pop(0)  # the original assistant turn, replaced below
            if not messages or messages[-1]["role"] == "assistant":
                continue
            text = render_chat(tokenizer, messages, where=f"conversation {i}")
            prompts.append(token_ids(tokenizer, text, where=f"conversation {i}"))
            rows.append(i)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            outs = generator.generate(chunk, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed + start,
                                      stop_token_ids=stop_ids)
            require_finite(outs, f"conversations {rows[start]}..{rows[min(start + batch_size, len(rows)) - 1]}")
            for i, o in zip(rows[start:start + batch_size], outs):
                tokens = [t for t in o.token_ids if t not in stop_ids]
                state[i][0].append({"role": "assistant",
                                    "content": tokenizer.decode(tokens, skip_special_tokens=True)})
                bar.update(1)
        pending = [i for i in pending if state[i][1]]
    bar.close()
    return [messages for messages, _ in state]


def write_jsonl(conversations: Sequence[Sequence[dict]], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps({"messages": list(conv)}, ensure_ascii=False) + "\n")
