"""Target architectures by ``model_type``: config parser, module class, weight-name rules.

Adding an architecture is one entry here plus, if its network differs, a
module implementing :class:`~eagle3_jax.models.target.TargetModel`
(docs/architecture.md#targets). Everything else (loading, conversion,
export, decoding, training) goes through this table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from eagle3_jax.config import LlamaConfig, Qwen3Config, TargetConfig, _show
from eagle3_jax.errors import ConfigError
from eagle3_jax.models.layers import DEFAULT_INIT_STD
from eagle3_jax.models.llama import LlamaForCausalLM
from eagle3_jax.models.qwen3 import Qwen3ForCausalLM
from eagle3_jax.weights.rules import RuleTable, llama_rules, qwen3_rules


@dataclasses.dataclass(frozen=True)
class TargetArchitecture:
    """One row of the registry.

    Attributes:
      model_type: the ``model_type`` of config.json.
      hf_class: the HF transformers class name (``architectures`` of config.json).
      config_class: the config dataclass.
      parse_config: ``(raw, where, generation_config, *, generation_where) -> config``.
      module: the NNX module class, built as ``module(cfg, dtype=, rngs=, init_std=)``.
      weight_rules: config -> checkpoint-name rules (``eagle3_jax/weights/rules.py``).
    """

    model_type: str
    hf_class: str
    config_class: type[TargetConfig]
    parse_config: Callable[..., TargetConfig]
    module: type
    weight_rules: Callable[[TargetConfig], RuleTable]


def _parsers():
    from eagle3_jax import hf_config

    return hf_config.parse_qwen3, hf_config.parse_llama


def _parse_qwen3(*args, **kwargs):
    return _parsers()[0](*args, **kwargs)


def _parse_llama(*args, **kwargs):
    return _parsers()[1](*args, **kwargs)


TARGETS: dict[str, TargetArchitecture] = {
    "qwen3": TargetArchitecture("qwen3", "Qwen3ForCausalLM", Qwen3Config, _parse_qwen3, Qwen3ForCausalLM,
                                lambda cfg: qwen3_rules(cfg.tie_word_embeddings)),
    "qwen2": TargetArchitecture("qwen2", "Qwen2ForCausalLM", Qwen3Config, _parse_qwen3, Qwen3ForCausalLM,
                                lambda cfg: qwen3_rules(cfg.tie_word_embeddings)),
    "llama": TargetArchitecture("llama", "LlamaForCausalLM", LlamaConfig, _parse_llama, LlamaForCausalLM,
                                lambda cfg: llama_rules(cfg.tie_word_embeddings)),
}


def target_architecture(raw_or_config: Mapping[str, Any] | TargetConfig, where: str = "config.json", *,
                        among: tuple[str, ...] | None = None) -> TargetArchitecture:
    """The registry entry for a config.json dict (by its ``model_type``) or a config.

    Raises:
      ConfigError: the model_type is not registered (or not in ``among``), naming ``where``.
    """
    if isinstance(raw_or_config, TargetConfig):
        return TARGETS[raw_or_config.model_type]
    if not isinstance(raw_or_config, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {_show(raw_or_config)}")
    supported = among or tuple(TARGETS)
    if raw_or_config.get("draft_vocab_size") is not None or raw_or_config.get("speculators_model_type") is not None:
        key = "draft_vocab_size" if raw_or_config.get("draft_vocab_size") is not None else "speculators_model_type"
        raise ConfigError(f"{where}: this is an EAGLE-3 draft head's config (it has {key}), not a target's; "
                          "pass it as the draft (--draft / load_draft)")
    model_type = raw_or_config.get("model_type")
    if not isinstance(model_type, str) or model_type not in supported:
        if among and isinstance(model_type, str) and model_type in TARGETS:  # a Qwen3Config asked to read a llama
            raise ConfigError(f"{where}: unknown model_type {_show(model_type)} for a config class that reads "
                              f"{', '.join(supported)}; TargetConfig.from_pretrained / from_hf_dict read every "
                              f"supported type ({', '.join(TARGETS)})")
        raise ConfigError(f"{where}: unknown model_type {_show(model_type)}; eagle3-jax supports "
                          f"{', '.join(supported)} targets")
    return TARGETS[model_type]


def build_target(cfg: TargetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 init_std: float = DEFAULT_INIT_STD):
    """A target of ``cfg``'s architecture with random weights (``init_std`` their scale)."""
    module = target_architecture(cfg).module
    return module(cfg, dtype=dtype, rngs=rngs if rngs is not None else nnx.Rngs(0), init_std=init_std)


def abstract_target(cfg: TargetConfig, dtype):
    """The target's structure with shapes and dtypes but no memory."""
    return nnx.eval_shape(lambda: build_target(cfg, dtype=dtype))


def target_rules(cfg: TargetConfig) -> RuleTable:
    """The checkpoint-name rules of ``cfg``'s architecture."""
    return target_architecture(cfg).weight_rules(cfg)
