"""Target architectures by ``model_type``: config parser, module class, weight-name rules.

Adding an architecture is one entry here plus, if its network differs, a
module implementing :class:`~eagle3_jax.models.target.TargetModel`
(docs/architecture.md#targets). Everything else (loading, conversion,
export, decoding, training) goes through this table.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from eagle3_jax.config import LlamaConfig, Qwen3Config, TargetConfig
from eagle3_jax.errors import ConfigError
from eagle3_jax.hf_config import check_model_type, parse_llama, parse_qwen3, read_generation_config
from eagle3_jax.hf_json import read_json
from eagle3_jax.models.layers import DEFAULT_INIT_STD
from eagle3_jax.models.llama import LlamaForCausalLM
from eagle3_jax.models.qwen3 import Qwen3ForCausalLM
from eagle3_jax.sharding import param_axes
from eagle3_jax.validation import show
from eagle3_jax.weights.params import flat_params
from eagle3_jax.weights.rules import RuleTable, decoder_lm_rules


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


def _decoder_rules(cfg: TargetConfig) -> RuleTable:
    """The three architectures share their checkpoint names (``DecoderLM``)."""
    return decoder_lm_rules(cfg.tie_word_embeddings)


TARGETS: dict[str, TargetArchitecture] = {
    "qwen3": TargetArchitecture("qwen3", "Qwen3ForCausalLM", Qwen3Config, parse_qwen3, Qwen3ForCausalLM,
                                _decoder_rules),
    "qwen2": TargetArchitecture("qwen2", "Qwen2ForCausalLM", Qwen3Config, parse_qwen3, Qwen3ForCausalLM,
                                _decoder_rules),
    "llama": TargetArchitecture("llama", "LlamaForCausalLM", LlamaConfig, parse_llama, LlamaForCausalLM,
                                _decoder_rules),
}


def target_architecture(raw_or_config: Mapping[str, Any] | TargetConfig, where: str = "config.json", *,
                        among: tuple[str, ...] | None = None) -> TargetArchitecture:
    """The registry entry for a config.json dict (by its ``model_type``) or a config.

    Raises:
      ConfigError: the model_type is not registered (or not in ``among``), naming ``where``.
    """
    if isinstance(raw_or_config, TargetConfig):
        return TARGETS[raw_or_config.model_type]
    supported = among or tuple(TARGETS)
    if isinstance(raw_or_config, Mapping):
        for key in ("draft_vocab_size", "speculators_model_type"):
            if raw_or_config.get(key) is not None:
                raise ConfigError(f"{where}: this is an EAGLE-3 draft head's config (it has {key}), not a "
                                  "target's; pass it as the draft (--draft / load_draft)")
        model_type = raw_or_config.get("model_type")
        if isinstance(model_type, str) and model_type in TARGETS and model_type not in supported:
            raise ConfigError(f"{where}: unknown model_type {show(model_type)} for a config class that reads "
                              f"{', '.join(supported)}; read_target_config / target_config_from_hf read every "
                              f"supported type ({', '.join(TARGETS)})")
    return TARGETS[check_model_type(raw_or_config, where, supported)]


def target_config_from_hf(raw: Mapping[str, Any], where: str = "config.json",
                          generation_config: Mapping[str, Any] | None = None, *,
                          generation_where: str = "generation_config.json",
                          among: tuple[str, ...] | None = None) -> TargetConfig:
    """A target's config from an HF ``config.json`` dict, parsed by its ``model_type``'s parser.

    ``generation_config`` (the dict of ``generation_config.json``) adds its eos
    ids; ``among`` limits the accepted model types (e.g. ``Qwen3Config.MODEL_TYPES``).

    Raises:
      ConfigError: an unknown ``model_type``, or what the parser refuses.
    """
    arch = target_architecture(raw, where, among=among)
    return arch.parse_config(raw, where, generation_config, generation_where=generation_where)


def read_target_config(model_dir: str | os.PathLike, *, among: tuple[str, ...] | None = None) -> TargetConfig:
    """A target's config from ``model_dir``: ``config.json`` and ``generation_config.json`` if present."""
    model_dir = os.fspath(model_dir)
    path = os.path.join(model_dir, "config.json")
    gen, gen_path = read_generation_config(model_dir)
    return target_config_from_hf(read_json(path), path, gen, generation_where=gen_path, among=among)


def build_target(cfg: TargetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 init_std: float = DEFAULT_INIT_STD):
    """A target of ``cfg``'s architecture with random weights (``init_std`` their scale)."""
    module = target_architecture(cfg).module
    return module(cfg, dtype=dtype, rngs=rngs if rngs is not None else nnx.Rngs(0), init_std=init_std)


def abstract_target(cfg: TargetConfig, dtype):
    """The target's structure with shapes and dtypes but no memory."""
    return nnx.eval_shape(lambda: build_target(cfg, dtype=dtype))


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One target parameter as the registry knows it: its checkpoint tensor, its shape and its layout.

    Attributes:
      checkpoint: the HF checkpoint tensor's name (``model.layers.0.self_attn.q_proj.weight``).
      transpose: whether the checkpoint stores it transposed (HF ``nn.Linear``: [out, in]).
      shape: the parameter's shape here (Flax: a kernel is [in, out]).
      axes: its logical axes on a device mesh, as its module declares them (``eagle3_jax/axes.py``).
    """

    checkpoint: str
    transpose: bool
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]


def param_specs(cfg: TargetConfig) -> dict[str, ParamSpec]:
    """Dotted parameter path -> :class:`ParamSpec` for every parameter of ``cfg``'s architecture: the
    checkpoint names (the architecture's rules) and the logical axes (declared by its modules) together."""
    abstract = abstract_target(cfg, jnp.float32)
    rules = target_rules(cfg)
    variables = flat_params(abstract)
    out = {}
    for path, axes in param_axes(abstract).items():
        name, rule = rules.checkpoint_name(path)
        out[path] = ParamSpec(checkpoint=name, transpose=rule.transpose, shape=tuple(variables[path].shape), axes=axes)
    return out


def target_rules(cfg: TargetConfig) -> RuleTable:
    """The checkpoint-name rules of ``cfg``'s architecture."""
    return target_architecture(cfg).weight_rules(cfg)
