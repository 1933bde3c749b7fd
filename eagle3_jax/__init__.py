"""eagle3-jax: EAGLE-3 speculative decoding for Qwen3, Qwen2 and Llama targets in JAX/Flax.

The public names below are imported on first use (PEP 562), so that
``import eagle3_jax`` and the command line's ``--help`` stay fast; JAX, Flax
and transformers load when a model or a generator is first touched.

Importing the package has no side effect: on GPUs, call
:func:`apply_default_flags` before JAX starts a backend for eagle3-jax's
recommended XLA flags (the ``eagle3-jax`` command does).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "AttentionMetadata": "eagle3_jax.attention",
    "Eagle3Config": "eagle3_jax.config",
    "LlamaConfig": "eagle3_jax.config",
    "Qwen3Config": "eagle3_jax.config",
    "TargetConfig": "eagle3_jax.config",
    "CheckpointError": "eagle3_jax.errors",
    "ConfigError": "eagle3_jax.errors",
    "Eagle3Error": "eagle3_jax.errors",
    "InputError": "eagle3_jax.errors",
    "NumericsError": "eagle3_jax.errors",
    "GenerationOutput": "eagle3_jax.generation",
    "Generator": "eagle3_jax.generation",
    "generate": "eagle3_jax.generation",
    "require_finite": "eagle3_jax.generation",
    "KVCache": "eagle3_jax.kv_cache",
    "convert_draft": "eagle3_jax.loading",
    "convert_target": "eagle3_jax.loading",
    "load_draft": "eagle3_jax.loading",
    "load_target": "eagle3_jax.loading",
    "save_draft": "eagle3_jax.loading",
    "Eagle3DraftHead": "eagle3_jax.models.eagle3",
    "LlamaForCausalLM": "eagle3_jax.models.llama",
    "Qwen3ForCausalLM": "eagle3_jax.models.qwen3",
    "build_target": "eagle3_jax.models.registry",
    "TargetModel": "eagle3_jax.models.target",
    "SamplingParams": "eagle3_jax.sampling",
    "make_mesh": "eagle3_jax.sharding",
    "apply_default_flags": "eagle3_jax.xla_flags",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'eagle3_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from eagle3_jax.attention import AttentionMetadata
    from eagle3_jax.config import Eagle3Config, LlamaConfig, Qwen3Config, TargetConfig
    from eagle3_jax.errors import CheckpointError, ConfigError, Eagle3Error, InputError, NumericsError
    from eagle3_jax.generation import GenerationOutput, Generator, generate, require_finite
    from eagle3_jax.kv_cache import KVCache
    from eagle3_jax.loading import convert_draft, convert_target, load_draft, load_target, save_draft
    from eagle3_jax.models.eagle3 import Eagle3DraftHead
    from eagle3_jax.models.llama import LlamaForCausalLM
    from eagle3_jax.models.qwen3 import Qwen3ForCausalLM
    from eagle3_jax.models.registry import build_target
    from eagle3_jax.models.target import TargetModel
    from eagle3_jax.sampling import SamplingParams
    from eagle3_jax.sharding import make_mesh
    from eagle3_jax.xla_flags import apply_default_flags
