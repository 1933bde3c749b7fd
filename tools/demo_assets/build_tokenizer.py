"""Train the demo's byte-level BPE tokenizer on the standard-library corpus.

    python tools/demo_assets/build_tokenizer.py --out DIR [--vocab-size 4096]

Writes tokenizer.json and tokenizer_config.json (a ``PreTrainedTokenizerFast``
with ``<|endoftext|>`` as id 0, the end-of-text and padding token).
"""

from __future__ import annotations

import argparse
import os

from eagle3_jax.demo.corpus import read, split

EOS = "<|endoftext|>"


def build_tokenizer(out: str, vocab_size: int = 4096) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    train_files, _ = split()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((read(f) for f in train_files), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False)
    os.makedirs(out, exist_ok=True)
    fast.save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args(argv)
    print(build_tokenizer(args.out, args.vocab_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
