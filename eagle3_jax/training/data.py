"""Training data: conversations or text -> token ids and loss masks -> static-shape batches.

Sources:

* JSONL conversations, one per line: OpenAI ``{"messages": [{"role", "content"}]}``
  or ShareGPT ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}``.
  They are rendered with the target tokenizer's chat template; the loss mask
  covers the assistant replies (their text and the end-of-turn token).
  A line ``{"text": "..."}`` is a plain-text example instead (loss on every
  token, no template).
* Plain text files (``.txt`` or any non-JSONL file): the loss covers every
  token; long files are cut into ``max_length`` windows.
* A Hugging Face dataset name (``hf:NAME[:SPLIT]``), read with the
  ``datasets`` library when it is installed (never in tests).

Batches are length-bucketed with static shapes: every example is padded to
the smallest bucket (a power of two from 64, capped at ``max_length``) that
holds it, and a batch always has ``batch_size`` rows (missing rows are
all-padding), so each bucket compiles once. The order is a pure function of
(seed, epoch): resuming at (epoch, position) reproduces the same batches.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence

import numpy as np

from eagle3_jax.errors import InputError
from eagle3_jax.jsonl import iter_jsonl

MIN_BUCKET = 64
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                 "system": "system", "chatgpt": "assistant", "bing": "assistant"}


@dataclasses.dataclass
class Example:
    """One training sequence: ``tokens`` [T] int32 and ``loss_mask`` [T] (1 where the loss counts)."""

    tokens: np.ndarray
    loss_mask: np.ndarray


# ------------------------------------------------------------------ sources

def _normalise_messages(record: dict, where: str) -> list[dict]:
    if "messages" in record:
        raw = record["messages"]
        role_key, text_key = "role", "content"
    elif "conversations" in record:
        raw = record["conversations"]
        role_key, text_key = "from", "value"
    else:
        raise InputError(f"{where}: expected a 'messages' (OpenAI) or 'conversations' (ShareGPT) list")
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{where}: the conversation is empty or not a list")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise InputError(f"{where}: turn {i} needs '{role_key}' and '{text_key}'")
        role = _ROLE_ALIASES.get(str(m[role_key]).lower())
        if role is None:
            raise InputError(f"{where}: turn {i} has unknown role {m[role_key]!r}")
        if not isinstance(m[text_key], str):
            raise InputError(f"{where}: turn {i} content is not a string")
        messages.append({"role": role, "content": m[text_key]})
    return messages


def read_conversations(path: str) -> list[list[dict]]:
    """Conversations from a JSONL file (OpenAI or ShareGPT format), as lists of {role, content}."""
    records = read_records(path)
    if any(isinstance(r, str) for r in records):
        raise InputError(f"{path}: expected conversations, found plain 'text' records")
    return records


def read_records(path: str) -> list:
    """A JSONL file's records: conversations (lists of {role, content}) and plain texts (str)."""
    out = []
    for n, record in iter_jsonl(path):
        if "text" in record and "messages" not in record and "conversations" not in record:
            if not isinstance(record["text"], str):
                raise InputError(f"{path}:{n}: 'text' must be a string")
            out.append(record["text"])
        else:
            out.append(_normalise_messages(record, f"{path}:{n}"))
    if not out:
        raise InputError(f"{path}: no records found")
    return out


def read_hf_dataset(spec: str) -> list[list[dict]]:
    """``hf:NAME[:SPLIT]`` -> conversations, via the ``datasets`` library (downloads; user code only)."""
    parts = spec[3:].split(":")
    name, split = parts[0], (parts[1] if len(parts) > 1 else "train")
    try:
        import datasets
    except ImportError:
        raise InputError(f"{spec}: reading Hugging Face datasets needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise InputError(f"{spec}: could not load the dataset ({type(e).__name__}: {e})") from None
    return [_normalise_messages(dict(row), f"{spec}[{i}]") for i, row in enumerate(ds)]


def is_conversation_file(path: str) -> bool:
    return path.endswith((".jsonl", ".json"))


# ------------------------------------------------------------ tokenization

class ChatEncoder:
    """Renders conversations with a tokenizer's chat template and masks the assistant replies.

    The assistant header (what ``add_generation_prompt`` appends) and the
    end-of-turn marker are read off the template itself, so any ChatML-style
    template works (Qwen3, Qwen3-Thinking-2507, Qwen2.5); a template where
    they can not be found is a clear error.
    """

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("the tokenizer has no chat template; pass plain text files instead of conversations")
        self.tokenizer = tokenizer
        probe = [{"role": "user", "content": "PROBE_USER"}]
        bare = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
        prompted = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        if not prompted.startswith(bare) or len(prompted) == len(bare):
            raise InputError("could not find the assistant header in the chat template")
        self.header = prompted[len(bare):]
        reply = "PROBE_REPLY"
        full = tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": reply}], tokenize=False)
        at = full.rfind(reply)
        if at < 0:
            raise InputError("could not find the assistant reply in the chat template")
        tail = full[at + len(reply):]
        self.end = tail.strip("\n") or tokenizer.eos_token or ""
        if not self.end:
            raise InputError("could not find the end-of-turn marker in the chat template")
        # The header may already contain part of the reply scaffolding (e.g. "<think>\n"); the search for
        # replies starts after the header's last line.
        self.header_start = self.header.split("\n")[0]

    def encode(self, messages: Sequence[dict], max_length: int) -> Example:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False)
        spans = []
        pos = 0
        while True:
            start = text.find(self.header_start, pos)
            if start < 0:
                break
            begin = start + len(self.header_start)
            nl = text.find("\n", begin)
            begin = nl + 1 if nl >= 0 else begin
            end = text.find(self.end, begin)
            stop = len(text) if end < 0 else end + len(self.end)
            spans.append((begin, stop))
            pos = stop
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"][:max_length], np.int32)
        offsets = enc["offset_mapping"][:max_length]
        mask = np.zeros(len(ids), np.int32)
        for i, (a, b) in enumerate(offsets):
            if any(a >= s and b <= e and b > a for s, e in spans):
                mask[i] = 1
        return Example(tokens=ids, loss_mask=mask)


def encode_text(tokenizer, text: str, max_length: int) -> list[Example]:
    """A plain text cut into windows of ``max_length`` tokens, the loss on every token."""
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    return [Example(tokens=ids[i:i + max_length], loss_mask=np.ones(len(ids[i:i + max_length]), np.int32))
            for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) >= 2]


def expand_sources(sources: Iterable[str]) -> list[str]:
    """Sources with every directory replaced by the files under it (sorted, hidden files skipped)."""
    out = []
    for src in sources:
        if not src.startswith("hf:") and os.path.isdir(src):
            found = sorted(os.path.join(root, f) for root, _, files in os.walk(src) for f in files
                           if not f.startswith("."))
            if not found:
                raise InputError(f"{src}: the directory holds no files")
            out += found
        else:
            out.append(src)
    return out


def load_examples(sources: Iterable[str], tokenizer, max_length: int) -> list[Example]:
    """Tokenizes every source (JSONL records, ``hf:`` datasets, text files, or directories of them)."""
    examples: list[Example] = []
    chat = None
    for src in expand_sources(sources):
        if src.startswith("hf:") or is_conversation_file(src):
            records = read_hf_dataset(src) if src.startswith("hf:") else read_records(src)
            for record in records:
                if isinstance(record, str):
                    examples += encode_text(tokenizer, record, max_length)[:1]
                else:
                    chat = chat or ChatEncoder(tokenizer)
                    examples.append(chat.encode(record, max_length))
        else:
            try:
                with open(src, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError as e:
                raise InputError(f"{src}: cannot read ({e.strerror})") from None
            examples += encode_text(tokenizer, text, max_length)
    examples = [e for e in examples if len(e.tokens) >= 2 and e.loss_mask.any()]
    if not examples:
        raise InputError("the training data holds no example with a token to learn (check the loss mask)")
    return examples


# ------------------------------------------------------------------ batches

def buckets_for(max_length: int) -> list[int]:
    """The length buckets of ``max_length``: 64, 128, 256, then four per doubling (320, 384, 448, 512, 640, ...),
    and ``max_length`` itself.

    Each bucket compiles the training step once; past 256 tokens a sequence
    fills at least four fifths of its bucket (with buckets doubling, a
    300-token reply padded to 512 would spend 40% of its step on padding),
    while the number of buckets grows with the logarithm of ``max_length``.
    """
    out, b = [], MIN_BUCKET
    while b < max_length:
        out.append(b)
        b += b if b < 256 else 1 << (b.bit_length() - 3)
    return out + [max_length]


def group_by_bucket(lengths: Iterable[int], buckets: Sequence[int]) -> dict[int, list[int]]:
    """bucket -> the indices of the lengths it holds (the smallest bucket each fits), in index order."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(next(b for b in buckets if n <= b), []).append(i)
    return groups


@dataclasses.dataclass
class Batch:
    """A static-shape batch. ``valid`` marks real tokens; all-padding rows have no valid token."""

    tokens: np.ndarray      # [batch, length] int32
    loss_mask: np.ndarray   # [batch, length] int32
    valid: np.ndarray       # [batch, length] bool


class Batcher:
    """Deterministic, length-bucketed batches: ``batch(epoch, position)``.

    Args:
      examples: the tokenized examples.
      batch_size: rows per batch (static).
      max_length: the largest bucket.
      seed: the order of epoch e is a pure function of (seed, e).
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, max_length: int, seed: int = 0):
        if batch_size < 1:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.buckets = buckets_for(max_length)
        self.seed = seed
        self._by_bucket = group_by_bucket((len(ex.tokens) for ex in self.examples), self.buckets)

    def plan(self, epoch: int) -> list[tuple[int, list[int]]]:
        """(bucket, example indices) of every batch of ``epoch``, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for bucket in sorted(self._by_bucket):
            idx = rng.permutation(self._by_bucket[bucket]).tolist()
            batches += [(bucket, idx[i:i + self.batch_size]) for i in range(0, len(idx), self.batch_size)]
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def __len__(self) -> int:
        return sum(-(-len(v) // self.batch_size) for v in self._by_bucket.values())

    def batch(self, epoch: int, position: int) -> Batch:
        bucket, idx = self.plan(epoch)[position]
        return self.collate(bucket, [self.examples[i] for i in idx])

    def collate(self, length: int, rows: Sequence[Example]) -> Batch:
        tokens = np.zeros((self.batch_size, length), np.int32)
        mask = np.zeros((self.batch_size, length), np.int32)
        valid = np.zeros((self.batch_size, length), bool)
        for r, ex in enumerate(rows):
            n = len(ex.tokens)
            tokens[r, :n], mask[r, :n], valid[r, :n] = ex.tokens, ex.loss_mask, True
            mask[r, n - 1] = 0  # the last token has no next-next token to predict
        return Batch(tokens=tokens, loss_mask=mask, valid=valid)
