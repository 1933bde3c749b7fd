"""Regenerating training answers with the target itself.

A head learns the target's own distribution best from the target's own
outputs (this matters most for thinking models, whose traces no dataset
holds). For every conversation the user (and system) turns are kept and
each assistant turn is replaced by the target's reply to the conversation
so far; conversations that end with a user turn get one reply appended.
Replies are generated in blocks of conversations, turn by turn, with
:class:`Generator`; a stopped run resumes exactly (:func:`regenerate`'s
``done`` and ``on_block``; ``eagle3-jax regenerate --resume``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence

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
               progress: bool = True, stream_every: int = 8, done: Mapping[int, list[dict]] | None = None,
               on_block: Callable[[int, list[list[dict]]], None] | None = None) -> list[list[dict]]:
    """Returns the conversations with every assistant turn written by the target.

    Conversations go in blocks of ``batch_size``: every turn of a block is
    generated before the next block starts, and the block that starts at
    conversation ``s`` draws with seed ``seed + s``. A block's replies
    therefore depend on nothing outside it, which makes a stopped run resume
    exactly: ``done`` maps the indices of conversations already regenerated
    to their result (a block all of whose conversations are done is
    skipped), and ``on_block(s, block)`` receives each block as it completes
    (``eagle3-jax regenerate`` appends it to its progress file).

    With ``progress`` a bar counts the replies, advancing as their tokens are
    generated (every ``stream_every`` decoding iterations), not once per batch:
    a reply in progress counts as the share of ``max_new_tokens`` it has
    generated, and as one reply when it ends; the bar's postfix gives the tokens
    generated so far and their rate. The replies are the same with or without it.
    """
    sampling = sampling or SamplingParams()
    done = dict(done or {})
    results: list[list[dict] | None] = [done.get(i) for i in range(len(conversations))]
    blocks = [s for s in range(0, len(conversations), batch_size)
              if not all(i in done for i in range(s, min(s + batch_size, len(conversations))))]
    total = sum(_turn_plan(conversations[i])[1] for s in blocks
                for i in range(s, min(s + batch_size, len(conversations))))
    bar = _ReplyProgress(total, max_new_tokens, generator.config.eos_token_ids) if progress else None
    for s in blocks:
        block = _regenerate_block(generator, tokenizer, conversations[s:s + batch_size], first=s,
                                  max_new_tokens=max_new_tokens, sampling=sampling, seed=seed + s, bar=bar,
                                  stream_every=stream_every)
        results[s:s + len(block)] = block
        if on_block is not None:
            on_block(s, block)
    if bar is not None:
        bar.close()
    return results


def _regenerate_block(generator: Generator, tokenizer, conversations: Sequence[Sequence[dict]], *, first: int,
                      max_new_tokens: int, sampling: SamplingParams, seed: int, bar, stream_every: int
                      ) -> list[list[dict]]:
    """One block, turn by turn: each round generates the next reply of every conversation that needs one."""
    stop_ids = generator.config.eos_token_ids
    state = [([], list(conv)) for conv in conversations]  # (messages so far, source turns left)
    pending = list(range(len(conversations)))
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
            where = f"conversation {first + i}"
            prompts.append(token_ids(tokenizer, render_chat(tokenizer, messages, where=where), where=where))
            rows.append(i)
        if prompts:
            live = bar.batch(len(prompts)) if bar is not None else None
            outs = generator.generate(prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                      stop_token_ids=stop_ids, stream=live, stream_every=stream_every)
            if bar is not None:
                bar.end_batch()
            require_finite(outs, f"conversations {first + rows[0]}..{first + rows[-1]}")
            for i, o in zip(rows, outs):
                tokens = [t for t in o.token_ids if t not in stop_ids]
                state[i][0].append({"role": "assistant",
                                    "content": tokenizer.decode(tokens, skip_special_tokens=True)})
        pending = [i for i in pending if state[i][1]]
    return [messages for messages, _ in state]


class _ReplyProgress:
    """A bar over replies that moves with the tokens: the ``stream`` callback of one batch at a time."""

    def __init__(self, total: int, max_new_tokens: int, stop_ids: Sequence[int]):
        self.max_new_tokens = max_new_tokens
        self.stop_ids = set(stop_ids)
        self.tokens = 0
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=total, desc="regenerating", unit="reply",
                        bar_format="{l_bar}{bar}| {n:.1f}/{total} replies [{elapsed}<{remaining}{postfix}]")
        self.credit: list[float] = []
        self.counts: list[int] = []

    def batch(self, rows: int):
        """Starts a batch of ``rows`` replies; returns the callback for :meth:`Generator.generate`'s ``stream``."""
        self.credit, self.counts = [0.0] * rows, [0] * rows
        return self._on_tokens

    def _on_tokens(self, row: int, new_tokens: list[int]) -> None:
        self.counts[row] += len(new_tokens)
        self.tokens += len(new_tokens)
        done = self.counts[row] >= self.max_new_tokens or any(t in self.stop_ids for t in new_tokens)
        self._credit(row, 1.0 if done else self.counts[row] / self.max_new_tokens)
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens} tokens, {self.tokens / seconds:.1f} tok/s", refresh=False)

    def _credit(self, row: int, value: float) -> None:
        value = max(self.credit[row], min(value, 1.0))
        if value > self.credit[row]:
            self.bar.update(value - self.credit[row])
            self.credit[row] = value

    def end_batch(self) -> None:
        """Every reply of the batch is done (some may have ended without a stop token, e.g. on a full cache)."""
        for row in range(len(self.credit)):
            self._credit(row, 1.0)
        self.bar.n = round(self.bar.n)  # whole replies again (the shares' float sum may be off by an ulp)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def write_jsonl(conversations: Sequence[Sequence[dict]], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps({"messages": list(conv)}, ensure_ascii=False) + "\n")
