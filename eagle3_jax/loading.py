"""Loading targets from HF checkpoints or converted directories, and converting them."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from eagle3_jax.config import Qwen3Config
from eagle3_jax.errors import ConfigError
from eagle3_jax.hub import resolve_model_dir
from eagle3_jax.models.qwen3 import Qwen3ForCausalLM
from eagle3_jax.weights import converted
from eagle3_jax.weights.params import load_safetensors_into
from eagle3_jax.weights.rules import qwen3_rules
from eagle3_jax.weights.safetensors_io import checkpoint_files

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def default_dtype():
    """bfloat16 on GPU/TPU (what the checkpoints hold), float32 on CPU (faster there)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def parse_dtype(dtype) -> jnp.dtype:
    """Accepts None (the default dtype), a name such as 'bfloat16', or a dtype."""
    if dtype is None or dtype == "auto":
        return jnp.dtype(default_dtype())
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def abstract_target(cfg: Qwen3Config, dtype) -> Qwen3ForCausalLM:
    """The target's structure with shapes and dtypes but no memory."""
    return nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def load_target(name_or_path: str | os.PathLike, *, dtype=None, progress: bool = True) -> Qwen3ForCausalLM:
    """Loads a Qwen3/Qwen2 target.

    Args:
      name_or_path: a local HF directory (config.json + model.safetensors or a
        sharded index), a directory written by :func:`convert_target`, or a
        Hub id fetched with ``huggingface_hub``.
      dtype: parameter and activation dtype ('float32', 'bfloat16', a jnp
        dtype, or None for bfloat16 on accelerators and float32 on CPU).
      progress: show a progress bar while tensors load.
    """
    model_dir = resolve_model_dir(name_or_path)
    dtype = parse_dtype(dtype)
    cfg = Qwen3Config.from_pretrained(model_dir)
    abstract = abstract_target(cfg, dtype)
    if converted.is_converted(model_dir):
        converted.read_marker(model_dir)
        return converted.restore_into(abstract, model_dir)
    return load_safetensors_into(abstract, checkpoint_files(model_dir), qwen3_rules(cfg.tie_word_embeddings),
                                 source=model_dir, progress=progress)


def convert_target(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, overwrite: bool = False,
                   progress: bool = True) -> str:
    """Converts an HF target checkpoint into the faster-loading orbax format at ``dst``.

    ``dtype`` defaults to bfloat16 (the dtype of published checkpoints);
    loading casts to whatever dtype is asked for then.
    """
    model_dir = resolve_model_dir(src)
    dtype = parse_dtype(dtype or "bfloat16")
    model = load_target(model_dir, dtype=dtype, progress=progress)
    return converted.save_converted(model, model_dir, os.fspath(dst), kind="target", overwrite=overwrite,
                                    extra={"source": os.fspath(src)})
