"""Writing small GGUF files for the tests, the way llama.cpp's converter writes them.

``write_gguf`` takes HF-named float32 tensors and an HF-style config, renames
the tensors to GGUF names, permutes llama q/k rows as llama.cpp's
``LlamaModel.permute`` does, and stores each tensor in the type asked for:
F32/F16/BF16 and the legacy quants through ``gguf.quants.quantize``; for the
K-quants, which the ``gguf`` package can only dequantize, random blocks with
finite scales (so each K-quant type is still read from real bytes).
"""

from __future__ import annotations

import re

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

HF_TO_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}
HF_TO_GGUF_LAYER = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_proj.bias": "attn_q.bias",
                    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
                    "self_attn.o_proj.bias": "attn_output.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
                    "self_attn.k_norm.weight": "attn_k_norm.weight",
                    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
# Offsets of the float16 scale fields in each K-quant block (gguf-py's quants.py block layouts).
K_SCALE_OFFSETS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF_GLOBAL:
        return HF_TO_GGUF_GLOBAL[hf]
    m = re.match(r"model\.layers\.(\d+)\.(.+)", hf)
    return f"blk.{m.group(1)}.{HF_TO_GGUF_LAYER[m.group(2)]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(rows: int, cols: int, qtype: T, rng: np.random.Generator) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off in K_SCALE_OFFSETS[qtype]:
        scale = rng.uniform(0.001, 0.02, size=(rows, cols // block)).astype(np.float16)
        raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def encode(values: np.ndarray, qtype: T, rng: np.random.Generator) -> tuple[np.ndarray, T]:
    if qtype == T.F32:
        return values.astype(np.float32), qtype
    if qtype == T.F16:
        return values.astype(np.float16), qtype
    if qtype in K_SCALE_OFFSETS:
        return random_k_blocks(*values.shape, qtype, rng), qtype
    try:
        return gguf.quants.quantize(values.astype(np.float32), qtype), qtype
    except NotImplementedError:  # a type the package can not write (and eagle3-jax does not read): random bytes
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return rng.integers(0, 256, size=(values.shape[0], values.shape[1] // block * size), dtype=np.uint8), qtype


def byte_tokens(n: int) -> list[str]:
    """n tokens: three specials, then single byte-level characters (as a gpt2 vocabulary spells them)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = [bytes_to_unicode()[b] for b in range(32, 127)] + [bytes_to_unicode()[b] for b in (10, 9)]
    return (["<unk>", "<s>", "</s>"] + chars)[:n]


def write_gguf(path, arch: str, config: dict, tensors: dict[str, np.ndarray], *, types: dict[str, T] | None = None,
               default: T = T.F32, tokens: list[str] | None = None, merges: list[str] | None = None,
               token_types: list[int] | None = None, pre: str = "gpt-2", eos: int | None = 2, permute: bool = True,
               chat_template: str | None = None, extra: dict | None = None, skip: tuple[str, ...] = (),
               add_bos: bool | None = None, seed: int = 0) -> str:
    """Writes ``tensors`` (HF names, float32) as a GGUF file of architecture ``arch`` described by ``config``."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    c = config
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c.get("max_position_embeddings", 512))
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_vocab_size(c["vocab_size"])
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    tokens = tokens if tokens is not None else byte_tokens(c["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types if token_types is not None else [3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges or [])
    w.add_bos_token_id(1)
    if eos is not None:
        w.add_eos_token_id(eos)
    if chat_template:
        w.add_chat_template(chat_template)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    types = types or {}
    for hf, values in tensors.items():
        if hf in skip:
            continue
        values = np.asarray(values, np.float32)
        if arch == "llama" and permute:
            if hf.endswith("q_proj.weight"):
                values = llama_cpp_permute(values, c["num_attention_heads"])
            elif hf.endswith("k_proj.weight"):
                values = llama_cpp_permute(values, c["num_key_value_heads"])
        qtype = types.get(hf, default if values.ndim == 2 else T.F32)
        data, qtype = encode(values, qtype, rng)
        if qtype in (T.F32, T.F16):
            w.add_tensor(gguf_name(hf), data)
        else:
            w.add_tensor(gguf_name(hf), data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def hf_tensors(model) -> dict[str, np.ndarray]:
    """A transformers model's float32 tensors by name (tied lm_head left out)."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd
