"""The tokenizer a GGUF file describes, as an HF tokenizer directory.

A GGUF file stores its tokenizer as metadata: ``tokenizer.ggml.model`` (the
kind), ``tokens``, ``merges``, ``token_type``, the special token ids, the
pre-tokenizer name ``tokenizer.ggml.pre`` and ``tokenizer.chat_template``.

Byte-level BPE files (``model`` = ``gpt2``: Llama 3, Qwen2, Qwen3, SmolLM and
most recent models) are rebuilt here with the ``tokenizers`` library, no
torch: the pre-tokenizer is chosen by name from :data:`PRE_TOKENIZERS`, the
table llama.cpp itself uses (``llama-vocab.cpp``), so text splits as it did
when the merges were learned. Control tokens (type 3) become special tokens
and user-defined ones (type 4, e.g. ``<think>``) added tokens, both matched
whole. An unknown pre-tokenizer name is an error rather than a guess: a wrong
split gives different token ids, silently.

SentencePiece files (``model`` = ``llama``: Llama 2, Mistral) are handed to
``transformers``' own GGUF tokenizer conversion, which needs torch in some
versions; a failure there says so.
"""

from __future__ import annotations

import json
import os

from eagle3_jax.errors import CheckpointError, ConfigError

# Regexes of llama.cpp's pre-tokenizers (the `regex_exprs` of llama-vocab.cpp), by pre name.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# pre name -> (splits applied in order, BPE ignore_merges, NFC normalizer)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "default": ((GPT2_SPLIT,), False, False),
    "gpt-2": ((GPT2_SPLIT,), False, False),
    "gpt2": ((GPT2_SPLIT,), False, False),
    "smollm": ((r"\p{N}", GPT2_SPLIT), False, False),
    "starcoder": ((r"\p{N}", GPT2_SPLIT), False, False),
    "refact": ((r"\p{N}", GPT2_SPLIT), False, False),
    "llama-bpe": ((LLAMA3_SPLIT,), True, False),
    "llama3": ((LLAMA3_SPLIT,), True, False),
    "llama-v3": ((LLAMA3_SPLIT,), True, False),
    "smaug-bpe": ((LLAMA3_SPLIT,), False, False),
    "dbrx": ((LLAMA3_SPLIT,), False, False),
    "qwen2": ((QWEN2_SPLIT,), False, True),
    "deepseek-r1-qwen": ((QWEN2_SPLIT,), False, True),
    "stablelm2": ((QWEN2_SPLIT,), False, False),
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types


def byte_level_tokenizer(tokens: list[str], merges: list[str], token_types: list[int] | None, pre: str,
                         *, where: str = "GGUF"):
    """A ``tokenizers.Tokenizer`` for a byte-level BPE vocabulary, split as llama.cpp's ``pre`` does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if pre not in PRE_TOKENIZERS:
        raise ConfigError(f"{where}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer eagle3-jax does not know "
                          f"(known: {', '.join(sorted(PRE_TOKENIZERS))}); guessing would give different token ids")
    splits, ignore_merges, nfc = PRE_TOKENIZERS[pre]
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{where}: tokenizer.ggml.merges holds {m!r:.40}, not two tokens separated by "
                                  "one space")
        pairs.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = list(token_types or [])
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    added = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if added:
        tok.add_tokens(added)
    return tok


def write_tokenizer(ckpt, out_dir: str) -> None:
    """Writes the HF tokenizer files (tokenizer.json, tokenizer_config.json, the chat template) of a GGUF file.

    ``ckpt`` is an opened :class:`eagle3_jax.weights.gguf_io.GGUFCheckpoint`.
    """
    where = ckpt.path
    kind = ckpt.string("tokenizer.ggml.model", None)
    if kind is None:
        raise ConfigError(f"{where}: the metadata field tokenizer.ggml.model is missing (the file has no tokenizer)")
    if kind == "gpt2":
        _write_byte_level(ckpt, out_dir)
    elif kind == "llama":
        _write_with_transformers(ckpt, out_dir)
    else:
        raise ConfigError(f"{where}: tokenizer.ggml.model is {kind!r}; eagle3-jax reads 'gpt2' (byte-level BPE) "
                          "and 'llama' (SentencePiece) tokenizers")


def _special(ckpt, tokens: list[str], key: str) -> str | None:
    index = ckpt.integer(f"tokenizer.ggml.{key}", None, minimum=0)
    if index is None:
        return None
    if index >= len(tokens):
        raise ConfigError(f"{ckpt.path}: tokenizer.ggml.{key} is {index}, outside the {len(tokens)} tokens")
    return tokens[index]


def _write_byte_level(ckpt, out_dir: str) -> None:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokens = ckpt.value("tokenizer.ggml.tokens")
    merges = ckpt.value("tokenizer.ggml.merges", [])
    types = ckpt.value("tokenizer.ggml.token_type", None)
    if types is not None and len(types) != len(tokens):
        raise ConfigError(f"{ckpt.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    pre = ckpt.string("tokenizer.ggml.pre", "default")
    tok = byte_level_tokenizer(list(tokens), list(merges), list(types) if types is not None else None, pre,
                               where=ckpt.path)
    bos = _special(ckpt, tokens, "bos_token_id")
    add_bos = ckpt.value("tokenizer.ggml.add_bos_token", False)
    if add_bos and bos is not None:
        bos_id = ckpt.integer("tokenizer.ggml.bos_token_id", minimum=0)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, bos_id)])])
    kwargs = {name: value for name, value in (
        ("bos_token", bos), ("eos_token", _special(ckpt, tokens, "eos_token_id")),
        ("unk_token", _special(ckpt, tokens, "unknown_token_id")),
        ("pad_token", _special(ckpt, tokens, "padding_token_id"))) if value is not None}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)
    template = ckpt.string("tokenizer.chat_template", None)
    if template:
        hf.chat_template = template
    hf.save_pretrained(out_dir)
    _ensure_template_file(out_dir, template)


def _write_with_transformers(ckpt, out_dir: str) -> None:
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(ckpt.path)),
                                           gguf_file=os.path.basename(ckpt.path))
    except Exception as e:
        raise CheckpointError(f"{ckpt.path}: its SentencePiece tokenizer is converted by transformers' GGUF support, "
                              f"which failed ({type(e).__name__}: {str(e)[:200]}); transformers needs torch for "
                              "this in some versions (pip install torch)") from None
    template = ckpt.string("tokenizer.chat_template", None)
    if template and not getattr(hf, "chat_template", None):
        hf.chat_template = template
    hf.save_pretrained(out_dir)
    _ensure_template_file(out_dir, template)


def _ensure_template_file(out_dir: str, template: str | None) -> None:
    """transformers 4 keeps the chat template in tokenizer_config.json, 5 in chat_template.jinja; both read either.
    Write the .jinja file when the version at hand did not, so the directory is the same for both."""
    path = os.path.join(out_dir, "chat_template.jinja")
    if template and not os.path.exists(path):
        config = os.path.join(out_dir, "tokenizer_config.json")
        with open(config, encoding="utf-8") as f:
            if json.load(f).get("chat_template") == template:
                return
        with open(path, "w", encoding="utf-8") as f:
            f.write(template)
