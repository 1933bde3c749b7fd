"""GGUF files in: llama.cpp's single-file checkpoints as HF directories.

A GGUF file holds a model's config and tokenizer as metadata (llama.cpp's key
names) and its tensors, usually quantized. :func:`convert_gguf` turns one into
an HF checkpoint directory that :func:`eagle3_jax.loading.load_target` (and
``transformers``) load:

- ``config.json`` and ``generation_config.json`` from the metadata
  (:func:`hf_config_of`), parsed by the same config parsers as any HF checkpoint;
- ``model.safetensors``: every tensor dequantized with the ``gguf`` package
  (numpy only) under its HF name (:data:`GLOBAL_TENSORS`,
  :data:`LAYER_TENSORS`), checked against the shape the config implies, with
  llama.cpp's q/k row order undone for ``llama`` files (:func:`unpermute_qk`);
- the tokenizer and chat template (``eagle3_jax/weights/gguf_tokenizer.py``).

Stored dtypes: by default each tensor keeps its precision (F32 and every
quantized type as float32, which holds their dequantized values exactly; F16
as float16; BF16 as bfloat16); ``dtype`` casts them all.

``eagle3_jax/weights/gguf_cache.py: cached_conversion`` converts a file once
into the user's cache and returns the directory; ``load_target("model.gguf")``
goes through it.

Architectures: ``llama``, ``qwen2``, ``qwen3``. Tensor types: F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K. Anything else (an
architecture, a type, a tensor name, a shape the metadata contradicts, a
truncated file) is a :class:`CheckpointError` or :class:`ConfigError` naming
the field or tensor, and the output directory is never left half-written.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any

import ml_dtypes
import numpy as np

from eagle3_jax.atomic import atomic_directory
from eagle3_jax.errors import CheckpointError, ConfigError

GGUF_MAGIC = b"GGUF"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Marker in the safetensors metadata of a converted GGUF (what --overwrite may replace).
MARKER_KEY = "eagle3_jax_gguf"

# Tensor names, GGUF -> HF (llama.cpp's gguf-py/gguf/tensor_mapping.py, read the other way).
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {  # blk.{i}.<key> -> model.layers.{i}.<value>
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")

# Tensor types read here: their names in GGMLQuantizationType.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
_KEEP = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    return gguf


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True for a regular file that starts with the GGUF magic bytes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's row order of a llama q or k projection ([n_head * head_dim, ...]).

    llama.cpp's converter stores each head's rows as interleaved (even, odd)
    pairs of the rotary halves (its ``LlamaModel.permute``): HF row order
    ``(head, half, i)`` becomes ``(head, i, half)``. This is the inverse.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"a q/k projection of {rows} rows does not split into {n_head} heads of even size")
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field_value(field) -> Any:
    """A metadata field's value: ``ReaderField.contents()`` where the gguf package has it, else read from its
    parts as older versions lay them out (a string's bytes; an array's elements after its type)."""
    if hasattr(field, "contents"):
        return field.contents()
    from gguf import GGUFValueType

    def one(part, kind):
        return bytes(part).decode("utf-8") if kind == GGUFValueType.STRING else part.tolist()[0]

    values = [field.parts[i] for i in field.data]
    if field.types[0] == GGUFValueType.ARRAY:
        return [one(v, field.types[-1]) for v in values]
    return one(values[0], field.types[0])


class GGUFCheckpoint:
    """One GGUF file, opened (memory-mapped) and checked for what a conversion needs.

    Raises:
      CheckpointError: not a GGUF file, truncated, unreadable, or an unknown tensor type.
      ConfigError: a missing or malformed metadata field, an unsupported architecture.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: no such file")
        if not is_gguf_file(self.path):
            raise CheckpointError(f"{self.path}: not a GGUF file (it does not start with the bytes 'GGUF')")
        self.size = os.path.getsize(self.path)
        gguf = _gguf()
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader fails in many ways on a cut-off or garbled file
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({self.size} bytes; truncated or corrupt?): "
                                  f"{type(e).__name__}: {str(e)[:200]}") from None
        self.fields = self._reader.fields
        self.architecture = self.string("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"{self.path}: general.architecture is {self.architecture!r}; eagle3-jax reads "
                              f"{', '.join(ARCHITECTURES)} GGUF files")
        self.tensors = {}
        for t in self._reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > self.size:
                raise CheckpointError(f"{self.path}: tensor {t.name} ends at byte {end}, past the end of the file "
                                      f"({self.size} bytes): the file is truncated")
            self.tensors[t.name] = t
        for name, t in self.tensors.items():
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise CheckpointError(f"{self.path}: tensor {name} is of type {t.tensor_type.name}, which eagle3-jax "
                                      f"does not dequantize (supported: {', '.join(SUPPORTED_TYPES)})")

    # ---------------------------------------------------------------- metadata

    def has(self, key: str) -> bool:
        return key in self.fields

    def value(self, key: str, default: Any = ...) -> Any:
        """The value of a metadata field (a scalar, a string or a list), or ``default`` when absent."""
        field = self.fields.get(key)
        if field is None:
            if default is ...:
                raise ConfigError(f"{self.path}: the metadata field {key} is missing")
            return default
        try:
            return _field_value(field)
        except Exception as e:
            raise ConfigError(f"{self.path}: the metadata field {key} is unreadable ({e})") from None

    def string(self, key: str, default: Any = ...) -> Any:
        value = self.value(key, default)
        if value is not default and not isinstance(value, str):
            raise ConfigError(f"{self.path}: the metadata field {key} should be a string, got {value!r:.60}")
        return value

    def integer(self, key: str, default: Any = ..., minimum: int = 1) -> Any:
        value = self.value(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ConfigError(f"{self.path}: the metadata field {key} should be an integer >= {minimum}, "
                              f"got {value!r:.60}")
        return int(value)

    def number(self, key: str, default: Any = ...) -> Any:
        value = self.value(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) \
                or value <= 0:
            raise ConfigError(f"{self.path}: the metadata field {key} should be a positive number, got {value!r:.60}")
        return float(value)

    def arch_key(self, suffix: str) -> str:
        return f"{self.architecture}.{suffix}"

    # ------------------------------------------------------------------ tensors

    def hf_name(self, name: str) -> str:
        """The HF name of a GGUF tensor, or a CheckpointError for a tensor eagle3-jax has no place for."""
        if name in GLOBAL_TENSORS:
            return GLOBAL_TENSORS[name]
        m = _LAYER.match(name)
        if m and m.group(2) in LAYER_TENSORS:
            return f"model.layers.{int(m.group(1))}.{LAYER_TENSORS[m.group(2)]}"
        if name == "rope_freqs.weight":
            raise CheckpointError(f"{self.path}: tensor rope_freqs.weight (Llama 3.1-style RoPE scaling) is not "
                                  "supported for GGUF files: its parameters are not in the metadata. Load the HF "
                                  "checkpoint instead")
        raise CheckpointError(f"{self.path}: tensor {name} has no counterpart in a {self.architecture} model")

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in HF (row-major) order: GGUF lists dimensions innermost first."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor's values in HF order: float32 for quantized and F32 tensors, else float16/bfloat16."""
        gguf = _gguf()
        t = self.tensors[name]
        kind = t.tensor_type.name
        try:
            if kind in ("F32", "F16"):
                values = np.asarray(t.data)
            elif kind == "BF16":
                values = np.asarray(t.data).view(np.uint16).view(ml_dtypes.bfloat16)
            else:
                values = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{self.path}: tensor {name} ({kind}) could not be dequantized: {e}") from None
        shape = self.shape(name)
        if values.size != int(np.prod(shape)):
            raise CheckpointError(f"{self.path}: tensor {name} ({kind}) holds {values.size} values, not the "
                                  f"{int(np.prod(shape))} of its shape {list(shape)}")
        return values.reshape(shape)


# --------------------------------------------------------------------- config

def hf_config_of(ckpt: GGUFCheckpoint) -> dict[str, Any]:
    """The HF ``config.json`` dict a GGUF file's metadata describes (llama, qwen2, qwen3)."""
    arch = ckpt.architecture
    k = ckpt.arch_key
    heads = ckpt.integer(k("attention.head_count"))
    hidden = ckpt.integer(k("embedding_length"))
    if ckpt.has(k("attention.key_length")):
        head_dim = ckpt.integer(k("attention.key_length"))
    elif ckpt.has(k("rope.dimension_count")) and arch == "llama":
        head_dim = ckpt.integer(k("rope.dimension_count"))
    else:
        head_dim = hidden // heads
    tokens = ckpt.fields.get("tokenizer.ggml.tokens")  # only its length here: the tokenizer reads the strings
    vocab = ckpt.integer(k("vocab_size"), None)
    if vocab is None:
        if "token_embd.weight" not in ckpt.tensors:
            raise CheckpointError(f"{ckpt.path}: tensor token_embd.weight is missing")
        vocab = ckpt.shape("token_embd.weight")[0]
    if tokens is not None and len(tokens.data) > vocab:
        raise ConfigError(f"{ckpt.path}: tokenizer.ggml.tokens lists {len(tokens.data)} tokens, more than the "
                          f"vocabulary of {vocab}")
    scaling = ckpt.string(k("rope.scaling.type"), None)
    if scaling not in (None, "none"):
        raise ConfigError(f"{ckpt.path}: {k('rope.scaling.type')} is {scaling!r}; RoPE scaling from GGUF metadata "
                          "is not supported")
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ckpt.integer(k("feed_forward_length")),
        "num_hidden_layers": ckpt.integer(k("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": ckpt.integer(k("attention.head_count_kv"), heads),
        "head_dim": head_dim,
        "rms_norm_eps": ckpt.number(k("attention.layer_norm_rms_epsilon")),
        "rope_theta": ckpt.number(k("rope.freq_base"), 10000.0 if arch == "llama" else 1000000.0),
        "max_position_embeddings": ckpt.integer(k("context_length"), 4096),
        "tie_word_embeddings": "output.weight" not in ckpt.tensors,
        "hidden_act": "silu",
    }
    if arch in ("llama", "qwen3"):
        config["attention_bias"] = "blk.0.attn_q.bias" in ckpt.tensors
    if arch == "llama":
        config["mlp_bias"] = False
    if arch in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
    special = {key: ckpt.integer(f"tokenizer.ggml.{gguf_key}", None, minimum=0) for key, gguf_key in
               (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                ("pad_token_id", "padding_token_id"))}
    for key, value in special.items():
        if value is not None:
            if value >= vocab:
                raise ConfigError(f"{ckpt.path}: tokenizer.ggml.{key} is {value}, outside the vocabulary of {vocab}")
            config[key] = value
    name = ckpt.string("general.name", None)
    if name:
        config["_name_or_path"] = name
    return config


def generation_config_of(ckpt: GGUFCheckpoint, config: dict[str, Any]) -> dict[str, Any]:
    """``generation_config.json``: the end-of-sequence ids (eos, and eot/eom when the file names them)."""
    eos = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = ckpt.integer(f"tokenizer.ggml.{key}", None, minimum=0)
        if value is not None and value < config["vocab_size"] and value not in eos:
            eos.append(value)
    out: dict[str, Any] = {}
    if "bos_token_id" in config:
        out["bos_token_id"] = config["bos_token_id"]
    if eos:
        out["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    return out


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The HF shape of every tensor a model of ``config`` may hold (optional ones included)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q), "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (h,),
        "self_attn.q_norm.weight": (config["head_dim"],), "self_attn.k_norm.weight": (config["head_dim"],),
        "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
    }
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        out.update({f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()})
    return out


class Plan:
    """Which GGUF tensor becomes which HF tensor, of what shape and stored dtype; checked before any is read."""

    def __init__(self, ckpt: GGUFCheckpoint, config: dict[str, Any], dtype: np.dtype | None):
        self.ckpt, self.config = ckpt, config
        shapes = expected_shapes(config)
        self.source: dict[str, str] = {}
        self.specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for name in ckpt.tensors:
            hf = ckpt.hf_name(name)
            if hf not in shapes:  # a layer index past block_count
                raise ConfigError(f"{ckpt.path}: tensor {name} is beyond the {config['num_hidden_layers']} layers of "
                                  f"{ckpt.arch_key('block_count')}")
            if ckpt.shape(name) != shapes[hf]:
                raise ConfigError(f"{ckpt.path}: tensor {name} has shape {list(ckpt.shape(name))} (HF order), but the "
                                  f"metadata implies {list(shapes[hf])} for {hf}")
            stored = dtype if dtype is not None else _KEEP.get(ckpt.type_name(name), np.dtype(np.float32))
            self.source[hf] = name
            self.specs[hf] = (shapes[hf], np.dtype(stored))
        required = ["model.embed_tokens.weight", "model.norm.weight"]
        per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                     "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                     "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
        if ckpt.architecture == "qwen3":
            per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
        if ckpt.architecture == "qwen2":
            per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        required += [f"model.layers.{i}.{n}" for i in range(config["num_hidden_layers"]) for n in per_layer]
        gguf_of = {v: k for k, v in GLOBAL_TENSORS.items()}
        gguf_of.update({v: k for k, v in LAYER_TENSORS.items()})
        for hf in required:
            if hf not in self.source:
                m = re.match(r"model\.layers\.(\d+)\.(.+)", hf)
                name = f"blk.{m.group(1)}.{gguf_of[m.group(2)]}" if m else gguf_of[hf]
                raise CheckpointError(f"{ckpt.path}: tensor {name} ({hf}) is missing")

    def produce(self, hf: str) -> np.ndarray:
        name = self.source[hf]
        values = self.ckpt.dequantize(name)
        if self.ckpt.architecture == "llama":
            if hf.endswith("self_attn.q_proj.weight"):
                values = unpermute_qk(values, self.config["num_attention_heads"])
            elif hf.endswith("self_attn.k_proj.weight"):
                values = unpermute_qk(values, self.config["num_key_value_heads"])
        from eagle3_jax.weights.params import count_nonfinite

        if count_nonfinite(values):
            raise CheckpointError(f"{self.ckpt.path}: tensor {name} ({self.ckpt.type_name(name)}) holds NaN or Inf "
                                  "after dequantization")
        with np.errstate(over="ignore"):
            return values.astype(self.specs[hf][1])


def parse_store_dtype(dtype) -> np.dtype | None:
    """None or 'keep': each tensor's own precision; else one of float32, bfloat16, float16."""
    if dtype in (None, "keep", "auto"):
        return None
    names = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ConfigError(f"unknown dtype {dtype!r}; choose keep, {', '.join(names)}")
        return np.dtype(names[dtype])
    return np.dtype(dtype)


def is_gguf_conversion(path: str) -> bool:
    """True if ``path`` is a directory :func:`convert_gguf` wrote (what ``overwrite`` may replace)."""
    from eagle3_jax.weights.safetensors_io import directory_metadata

    return MARKER_KEY in (directory_metadata(path) or {})


def convert_gguf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Converts a GGUF file into an HF checkpoint directory at ``dst`` (atomically).

    Args:
      src: the ``.gguf`` file.
      dst: the output directory (must not exist, unless ``overwrite`` and it is
        an earlier conversion).
      dtype: None / 'keep' (each tensor's own precision; quantized ones as
        float32), or 'float32', 'bfloat16', 'float16' for all.
      progress: a progress bar over the tensors.

    Returns:
      a summary: the output directory, architecture, tensor types and counts, stored dtypes.
    """
    from tqdm.auto import tqdm

    from eagle3_jax.models.registry import target_config_from_hf
    from eagle3_jax.weights.gguf_tokenizer import write_tokenizer
    from eagle3_jax.weights.safetensors_io import save_streamed

    store = parse_store_dtype(dtype)
    ckpt = GGUFCheckpoint(src)
    config = hf_config_of(ckpt)
    generation = generation_config_of(ckpt, config)
    target_config_from_hf(config, where=f"{ckpt.path} (metadata)", generation_config=generation,
                              generation_where=f"{ckpt.path} (metadata)")
    plan = Plan(ckpt, config, store)
    types = dict(Counter(ckpt.type_name(name) for name in ckpt.tensors))
    stored = sorted({spec[1].name for spec in plan.specs.values()})
    config["torch_dtype"] = "float32" if "float32" in stored or not stored else stored[0]
    out = os.path.abspath(os.fspath(dst))
    with atomic_directory(out, overwrite=overwrite, replaceable=is_gguf_conversion, what="converted GGUF") as tmp:
        write_tokenizer(ckpt, tmp)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation, f, indent=2)
        bar = tqdm(total=len(plan.specs), desc="dequantizing", unit="tensor", disable=not progress)

        def produce(hf: str) -> np.ndarray:
            values = plan.produce(hf)
            bar.update(1)
            return values

        try:
            save_streamed(plan.specs, produce, os.path.join(tmp, "model.safetensors"),
                          metadata={"format": "pt", MARKER_KEY: os.path.basename(ckpt.path)})
        finally:
            bar.close()
    return {"output": out, "source": ckpt.path, "architecture": ckpt.architecture, "tensors": len(plan.specs),
            "gguf_types": types, "stored_dtypes": stored,
            "parameters": int(sum(int(np.prod(s)) for s, _ in plan.specs.values()))}
