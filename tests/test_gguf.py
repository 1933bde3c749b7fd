"""GGUF files in (eagle3_jax/weights/gguf_io.py, gguf_tokenizer.py).

The files are made here, as llama.cpp's converter makes them
(``tests/gguf_files.py``). Proven: the dequantized tensors equal what
transformers' own GGUF loader produces, for every supported type; llama's q/k
row order is undone (F32 files give back the HF weights exactly); greedy
tokens equal transformers on the dequantized model for llama, qwen2 and qwen3,
tied and untied; the tokenizer splits text as transformers' GGUF tokenizer
does; bad files are clear errors that leave nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from conftest import hf_greedy, make_hf_model

pytest.importorskip("gguf")  # a dependency of eagle3-jax; absent only where it was installed with --no-deps
from gguf import GGMLQuantizationType as T
from gguf_files import hf_tensors, write_gguf

from eagle3_jax import CheckpointError, ConfigError, Generator, load_target
from eagle3_jax.weights.gguf_cache import cached_conversion
from eagle3_jax.weights.gguf_io import GGUFCheckpoint, convert_gguf, unpermute_qk
from eagle3_jax.weights.safetensors_io import SafetensorsFile


def hf_config(model) -> dict:
    c = model.config
    return dict(num_hidden_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                intermediate_size=c.intermediate_size, num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                rope_theta=c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta,
                vocab_size=c.vocab_size, head_dim=getattr(c, "head_dim", None), max_position_embeddings=512)


def read_all(path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path)
    return {k: f.read(k) for k in f.keys()}


def test_field_values_without_contents(good_gguf):
    """Older gguf packages have no ReaderField.contents(): the fallback reads the same values."""
    from eagle3_jax.weights.gguf_io import _field_value

    ckpt = GGUFCheckpoint(good_gguf[0])
    for key in ("general.architecture", "llama.block_count", "llama.rope.freq_base", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id"):
        field = ckpt.fields[key]

        class Old:  # the same field without the method
            parts, data, types = field.parts, field.data, field.types

        assert _field_value(Old()) == field.contents(), key


def test_unpermute_inverts_llama_cpp_permute():
    from gguf_files import llama_cpp_permute

    w = np.arange(8 * 12 * 3, dtype=np.float32).reshape(8 * 12, 3)
    for heads in (1, 2, 4, 8):
        np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, heads), heads), w)
        if heads > 1:
            assert not np.array_equal(llama_cpp_permute(w, heads), w)


@pytest.fixture(scope="module")
def hf_llama_bias(tmp_path_factory):
    """Untied Llama with q/k/v/o biases and head_dim 12 != 40 / 4 (no RoPE scaling: GGUF metadata has none)."""
    return make_hf_model(tmp_path_factory.mktemp("llama_bias"), kind="llama", seed=7, head_dim=12,
                         attention_bias=True)


@pytest.mark.slow
@pytest.mark.parametrize("fixture,arch", [("hf_llama_bias", "llama"), ("hf_llama_tied", "llama"),
                                          ("hf_qwen2", "qwen2"), ("hf_qwen3", "qwen3"), ("hf_qwen3_tied", "qwen3")])
def test_f32_gguf_gives_back_the_hf_weights_and_greedy_tokens(fixture, arch, request, tmp_path):
    hf = request.getfixturevalue(fixture)
    tensors = hf_tensors(hf.model)
    path = write_gguf(tmp_path / "m.gguf", arch, hf_config(hf.model), tensors, eos=5)
    summary = convert_gguf(path, tmp_path / "hf", progress=False)
    assert summary["stored_dtypes"] == ["float32"] and summary["architecture"] == arch
    got = read_all(tmp_path / "hf" / "model.safetensors")
    assert set(got) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(got[k], tensors[k], err_msg=k)  # q/k rows back in HF order
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == hf.model.config.tie_word_embeddings
    # greedy tokens through load_target(file.gguf), against transformers on the same weights
    saved = os.environ.get("EAGLE3_JAX_CACHE")  # conftest's session cache: restored, not deleted
    os.environ["EAGLE3_JAX_CACHE"] = str(tmp_path / "cache")
    try:
        model = load_target(path, dtype="float32", progress=False)
    finally:
        if saved is None:
            del os.environ["EAGLE3_JAX_CACHE"]
        else:
            os.environ["EAGLE3_JAX_CACHE"] = saved
    prompt = [3, 17, 42, 8, 66, 20]
    ours = Generator(model, max_cache_len=64).generate([prompt], max_new_tokens=12)[0].token_ids
    assert len(ours) > 3
    assert ours == hf_greedy(hf.model, prompt, 12, stop_ids=[5])  # eos 5 comes from the file's metadata



# Every supported type on one tensor at least; 2-D shapes are multiples of 256 so the K-quants fit.
QUANT_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.BF16, T.F16]
BIG = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=256, num_attention_heads=4,
           num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=99,
           max_position_embeddings=512)


def big_llama(tmp_path, seed=0, **overrides):
    config = {**BIG, **overrides}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, tie_word_embeddings=False)).eval()
    tensors = hf_tensors(model)
    names = [k for k, v in tensors.items() if v.ndim == 2 and k != "model.embed_tokens.weight"]
    types = {name: QUANT_TYPES[i % len(QUANT_TYPES)] for i, name in enumerate(names)}
    return config, tensors, types


@pytest.mark.slow
def test_every_quantization_type_equals_transformers_gguf_loader(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config, tensors, types = big_llama(tmp_path)
    assert set(types.values()) == set(QUANT_TYPES)
    path = write_gguf(tmp_path / "q.gguf", "llama", config, tensors, types=types, default=T.Q8_0)
    summary = convert_gguf(path, tmp_path / "hf", progress=False)
    assert set(summary["gguf_types"]) == {t.name for t in QUANT_TYPES} | {"F32"}
    ours = read_all(tmp_path / "hf" / "model.safetensors")
    dtypes = {k: v.dtype.name for k, v in ours.items()}
    assert dtypes[[k for k, t in types.items() if t == T.F16][0]] == "float16"
    assert dtypes[[k for k, t in types.items() if t == T.BF16][0]] == "bfloat16"
    assert dtypes[[k for k, t in types.items() if t == T.Q4_K][0]] == "float32"
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, tie_word_embeddings=False))
    theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    assert set(theirs) == set(ours)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k].astype(np.float32), np.asarray(v, np.float32), err_msg=k)
    # and the whole model's greedy tokens equal transformers on the dequantized weights
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    target = load_target(tmp_path / "hf", dtype="float32", progress=False)
    prompt = [5, 9, 33, 71, 2, 40]
    ours_tokens = Generator(target, max_cache_len=64).generate([prompt], max_new_tokens=10)[0].token_ids
    assert ours_tokens == hf_greedy(hf, prompt, 10, stop_ids=[2])


def test_convert_dtype_option_casts_everything(tmp_path):
    config, tensors, types = big_llama(tmp_path)
    path = write_gguf(tmp_path / "q.gguf", "llama", config, tensors, types=types)
    summary = convert_gguf(path, tmp_path / "bf", dtype="bfloat16", progress=False)
    assert summary["stored_dtypes"] == ["bfloat16"]
    assert {v.dtype.name for v in read_all(tmp_path / "bf" / "model.safetensors").values()} == {"bfloat16"}


# ---------------------------------------------------------------- tokenizer

TEXTS = ["Hello world!  It's 2024: 16 eggs cost $3.50.\n\n\tdef f(x):\n    return x**2  # done",
         "Ünïcödé façade — 日本語のテキスト 🙂 and    spaces   ", "<s>special</s> tokens\r\n\r\nCRLF",
         "I'LL SAY THEY'RE 12345678 ok", ""]


def bpe_vocab():
    """A byte-level BPE vocabulary trained here on a few sentences, as a GGUF stores one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog 0123456789"] * 20, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, merges


@pytest.mark.parametrize("pre,add_bos", [("gpt-2", False), ("qwen2", False), ("llama-bpe", True)])
def test_tokenizer_splits_as_transformers_gguf_tokenizer(pre, add_bos, tmp_path):
    tokens, merges = bpe_vocab()
    config = {**BIG, "vocab_size": len(tokens), "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 32,
              "head_dim": 8}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    path = write_gguf(tmp_path / "t.gguf", "llama", config, hf_tensors(model), tokens=tokens, merges=merges,
                      pre=pre, chat_template=template, add_bos=add_bos)
    convert_gguf(path, tmp_path / "hf", progress=False)
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], (pre, text)
        assert ours(text, add_special_tokens=False)["input_ids"] == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ours(text, add_special_tokens=False)["input_ids"]) == text
    assert (ours("hi")["input_ids"][0] == 1) == add_bos
    assert ours("<s>", add_special_tokens=False)["input_ids"] == [1]  # a control token stays whole
    assert ours.chat_template == template and ours.eos_token == "</s>"


def test_smollm_pre_tokenizer_splits_digits_one_by_one(tmp_path):
    tokens, merges = bpe_vocab()
    assert "Ġ0" in tokens or any(len(t) > 1 and t.strip("Ġ").isdigit() for t in tokens)  # digits merge without it
    config = {**BIG, "vocab_size": len(tokens), "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 32,
              "head_dim": 8}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    path = write_gguf(tmp_path / "s.gguf", "llama", config, hf_tensors(model), tokens=tokens, merges=merges,
                      pre="smollm")
    convert_gguf(path, tmp_path / "hf", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    pieces = tok.convert_ids_to_tokens(tok(" 0123456789")["input_ids"])
    assert pieces == ["Ġ", *"0123456789"]


# ---------------------------------------------------------------- bad files

@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    config, tensors, types = big_llama(d)
    return write_gguf(d / "ok.gguf", "llama", config, tensors, types=types), config, tensors, types


def expect_nothing_left(tmp_path, call, error, match):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(error, match=match):
        call(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == before


def test_truncated_file(good_gguf, tmp_path):
    data = open(good_gguf[0], "rb").read()
    for cut in (len(data) - 1000, len(data) // 2, 200, 10):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        expect_nothing_left(tmp_path, lambda out, p=path: convert_gguf(p, out, progress=False), CheckpointError,
                            r"truncated")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not gguf")
    expect_nothing_left(tmp_path, lambda out: convert_gguf(tmp_path / "x.gguf", out), CheckpointError,
                        "not a GGUF file")


def test_unknown_architecture(good_gguf, tmp_path):
    _, config, tensors, types = good_gguf
    path = write_gguf(tmp_path / "g.gguf", "gemma2", config, tensors)
    expect_nothing_left(tmp_path, lambda out: convert_gguf(path, out), ConfigError,
                        r"general.architecture is 'gemma2'")


def test_unknown_quantization_type(good_gguf, tmp_path):
    _, config, tensors, types = good_gguf
    name = "model.layers.0.mlp.up_proj.weight"
    path = write_gguf(tmp_path / "iq.gguf", "llama", config, tensors, types={**types, name: T.IQ4_NL})
    expect_nothing_left(tmp_path, lambda out: convert_gguf(path, out), CheckpointError,
                        r"tensor blk\.0\.ffn_up\.weight is of type IQ4_NL")


@pytest.mark.parametrize("override,match", [
    ({"hidden_size": 128}, r"tensor token_embd\.weight has shape \[99, 256\].*implies \[99, 128\]"),
    ({"num_key_value_heads": 4}, r"tensor blk\.0\.attn_k\.weight has shape \[128, 256\].*implies \[256, 256\]"),
    ({"num_hidden_layers": 1}, r"tensor blk\.1\..* beyond the 1 layers of llama\.block_count"),
    ({"num_hidden_layers": 3}, r"tensor blk\.2\.attn_norm\.weight .* is missing"),
])
def test_metadata_that_disagrees_with_the_tensors(good_gguf, tmp_path, override, match):
    _, config, tensors, types = good_gguf
    path = write_gguf(tmp_path / "bad.gguf", "llama", {**config, **override}, tensors, types=types)
    expect_nothing_left(tmp_path, lambda out: convert_gguf(path, out), (ConfigError, CheckpointError), match)


def test_missing_tensor_and_missing_field(good_gguf, tmp_path):
    _, config, tensors, types = good_gguf
    path = write_gguf(tmp_path / "m.gguf", "llama", config, tensors, skip=("model.norm.weight",))
    expect_nothing_left(tmp_path, lambda out: convert_gguf(path, out), CheckpointError,
                        r"tensor output_norm\.weight \(model\.norm\.weight\) is missing")
    path = write_gguf(tmp_path / "v.gguf", "llama", config, tensors, pre="falcon-h9")
    expect_nothing_left(tmp_path, lambda out: convert_gguf(path, out), ConfigError,
                        r"tokenizer\.ggml\.pre is 'falcon-h9'")


def test_cli_convert_gguf(good_gguf, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "eagle3_jax.cli", "convert", *a], capture_output=True,
                                    text=True, timeout=300)
    done = run("--gguf", good_gguf[0], str(tmp_path / "out"), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["architecture"] == "llama" and summary["output"] == str(tmp_path / "out")
    assert GGUFCheckpoint(good_gguf[0]).architecture == "llama"
    (tmp_path / "cut.gguf").write_bytes(open(good_gguf[0], "rb").read()[:5000])
    bad = run("--gguf", str(tmp_path / "cut.gguf"), str(tmp_path / "out2"))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "truncated" in bad.stderr
    assert not (tmp_path / "out2").exists()


def test_cached_conversion_is_made_once(good_gguf, tmp_path):
    first = cached_conversion(good_gguf[0], cache_dir=str(tmp_path), progress=False)
    stamp = os.path.getmtime(os.path.join(first, "model.safetensors"))
    assert cached_conversion(good_gguf[0], cache_dir=str(tmp_path), progress=False) == first
    assert os.path.getmtime(os.path.join(first, "model.safetensors")) == stamp
    assert os.listdir(tmp_path) == [os.path.basename(first)]
