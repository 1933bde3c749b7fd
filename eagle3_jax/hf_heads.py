"""EAGLE-3 draft heads' ``config.json``: the three published formats in, SpecForge's out.

The typed key readers are ``eagle3_jax/hf_json.py``'s, the fields a head
shares with a Llama layer (sizes, RoPE) are read and written by
``eagle3_jax/hf_config.py``; this module knows the formats.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from eagle3_jax.config import MAX_LAYERS, MIN_AUX_LAYER_ID, Eagle3Config
from eagle3_jax.errors import ConfigError
from eagle3_jax.hf_config import build_config, check_act, layer_fields, layer_to_hf, rope_to_hf
from eagle3_jax.hf_json import json_bool, json_ids, json_int, json_mapping, json_object, json_require, read_json
from eagle3_jax.validation import show

# -------------------------------------------------------------- draft heads
#
# EAGLE-3 heads are published in three formats (docs/architecture.md#head-formats):
#
#   specforge    SpecForge / SGLang ``LlamaForCausalLMEagle3`` (also vLLM's
#                ``Eagle3LlamaForCausalLM``): a Llama config with draft_vocab_size,
#                target_hidden_size and eagle_config.eagle_aux_hidden_state_layer_ids
#                ("output of layer k": HF hidden_states index k + 1); model.safetensors,
#                tensors ``midlayer.*``.
#   eagle        the EAGLE authors' checkpoints (yuhuili/EAGLE3-*): the same Llama
#                config with ``architectures: [LlamaForCausalLM]``, no aux ids (the
#                default layers), rope_theta defaulting to 10000; pytorch_model.bin
#                in float16 without an embedding, tensors ``midlayer.*``.
#   speculators  vllm-project/speculators ``Eagle3Speculator``: speculators_model_type
#                "eagle3", the layer's Llama config nested in transformer_layer_config,
#                eagle_aux_hidden_state_layer_ids at the top ("input of layer k": HF
#                index k), norm_before_residual; tensors ``layers.0.*``.

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
EAGLE_DEFAULT_ROPE_THETA = 10000.0  # the EAGLE authors' code when config.json has no rope_theta


def head_format(raw: Mapping[str, Any], where: str = "config.json") -> str:
    """Which published format a draft head's config.json is in (see above).

    Raises:
      ConfigError: it is none of them (e.g. a target's config).
    """
    json_object(raw, where)
    if raw.get("speculators_model_type") is not None:
        kind = raw.get("speculators_model_type")
        if kind != "eagle3":
            raise ConfigError(f"{where}: a speculators model of type {show(kind)}, not an EAGLE-3 head "
                              "(speculators_model_type must be 'eagle3')")
        return "speculators"
    archs = raw.get("architectures")
    names = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    if any(a in EAGLE3_ARCHITECTURES for a in names):
        return "specforge"
    if ("LlamaForCausalLM" in names and raw.get("draft_vocab_size") is not None and raw.get("num_hidden_layers") == 1
            and raw.get("target_hidden_size") is None and raw.get("eagle_config") is None):
        return "eagle"  # the EAGLE authors' config: a plain Llama config plus draft_vocab_size, no SpecForge keys
    raise ConfigError(f"{where}: not an EAGLE-3 draft head (architectures={show(archs)}; expected one of "
                      f"{', '.join(EAGLE3_ARCHITECTURES)}, the EAGLE authors' single-layer LlamaForCausalLM with "
                      "draft_vocab_size and no SpecForge keys (target_hidden_size, eagle_config), or a speculators "
                      "config with speculators_model_type 'eagle3'). A SpecForge-trained head whose architectures "
                      "say LlamaForCausalLM loads once they say LlamaForCausalLMEagle3.")


def parse_eagle3(raw: Mapping[str, Any], where: str = "config.json") -> Eagle3Config:
    """Parses an EAGLE-3 head's ``config.json`` dict in any of the published formats.

    The head's aux layer ids are stored as SpecForge writes them
    (``aux_layer_ids``: features at the inputs of layers id + 1, i.e. HF
    hidden_states index id + 1), whatever the format said.

    Raises:
      ConfigError: as :func:`parse_qwen3`, or the head is not a single-layer
        EAGLE-3 Llama head without biases, or asks for a variant not
        implemented (``norm_before_fc``, ``fc_norm``, ``norm_output``).
    """
    fmt = head_format(raw, where)
    if fmt == "speculators":
        return _parse_speculators(raw, where)
    return _parse_llama_head(raw, where, eagle_format=fmt == "eagle")


def _parse_llama_head(raw: Mapping[str, Any], where: str, *, eagle_format: bool,
                      layer_where: str | None = None, aux_ids: tuple[int, ...] | None = None,
                      **extra: Any) -> Eagle3Config:
    """The single Llama decoder layer of a head; ``raw`` is the head's Llama config
    (config.json itself, or speculators' transformer_layer_config)."""
    lw = layer_where or where
    json_require(raw, lw, ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"))
    layers = json_int(raw, "num_hidden_layers", lw, default=1)
    if layers != 1:
        raise ConfigError(f"{lw}: only single-layer EAGLE-3 heads are supported (num_hidden_layers={layers})")
    check_act(raw, lw)
    flags = ("fc_norm", "norm_before_fc", "norm_output", "attention_bias", "mlp_bias", "tie_word_embeddings")
    if not eagle_format:  # the EAGLE authors' config carries bias=true for EAGLE-1/2; their EAGLE-3 fc has none
        flags = flags + ("bias",)
    for flag in flags:
        if json_bool(raw, flag, lw):
            raise ConfigError(f"{lw}: {flag}=true is not supported for EAGLE-3 heads")
    if aux_ids is None:
        eagle = json_mapping(raw, "eagle_config", lw) or {}
        if eagle.get("eagle_aux_hidden_state_layer_ids") is not None:
            aux_ids = json_ids(eagle, "eagle_aux_hidden_state_layer_ids", lw,
                           name="eagle_config.eagle_aux_hidden_state_layer_ids", lo=MIN_AUX_LAYER_ID,
                           hi=MAX_LAYERS - 2)
    layer = layer_fields(raw, lw, EAGLE_DEFAULT_ROPE_THETA if eagle_format else None)
    vocab = json_int(raw, "vocab_size", lw)
    eos = json_ids(raw, "eos_token_id", lw)
    fields = dict(
        **layer,
        vocab_size=vocab,
        draft_vocab_size=json_int(raw, "draft_vocab_size", lw, default=vocab),
        target_hidden_size=json_int(raw, "target_hidden_size", lw, default=layer["hidden_size"]),
        aux_layer_ids=aux_ids,
        eos_token_id=eos[0] if eos else None,
    )
    fields.update(extra)
    return build_config(Eagle3Config, where, **fields)


def _parse_speculators(raw: Mapping[str, Any], where: str) -> Eagle3Config:
    """A speculators ``Eagle3Speculator`` config: the layer's Llama config nested in
    ``transformer_layer_config``, the EAGLE-3 fields at the top."""
    layer = json_mapping(raw, "transformer_layer_config", where)
    if layer is None:
        raise ConfigError(f"{where}: missing required key(s): transformer_layer_config")
    layer_where = f"{where}: transformer_layer_config"
    model_type = layer.get("model_type")
    if model_type is not None and model_type != "llama":
        raise ConfigError(f"{layer_where}: model_type {show(model_type)} is not supported for the head's layer "
                          "(only 'llama')")
    for flag in ("norm_before_fc", "fc_norm", "norm_output"):
        if json_bool(raw, flag, where):
            raise ConfigError(f"{where}: {flag}=true is not supported (eagle3-jax implements the EAGLE-3 head "
                              "without extra feature or output norms)")
    ids = raw.get("eagle_aux_hidden_state_layer_ids")
    aux = None
    if ids is not None:  # speculators: features at the INPUT of layer k (HF index k); stored as k - 1
        ids = json_ids(raw, "eagle_aux_hidden_state_layer_ids", where, lo=0, hi=MAX_LAYERS - 1)
        aux = tuple(i - 1 for i in ids)
    merged = dict(layer)
    for key in ("draft_vocab_size", "target_hidden_size"):
        if raw.get(key) is not None:
            merged[key] = json_int(raw, key, where)  # checked here, so an error names the top-level key
    return _parse_llama_head(merged, where, eagle_format=False, layer_where=layer_where, aux_ids=aux,
                             norm_before_residual=json_bool(raw, "norm_before_residual", where))


def eagle3_to_hf(cfg: Eagle3Config) -> dict[str, Any]:
    """config.json in the SpecForge format (what SpecForge, SGLang and vLLM load)."""
    if cfg.norm_before_residual:
        raise ConfigError("a head with norm_before_residual=true has no SpecForge config.json spelling "
                          "(it is a speculators-format head)")
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        **layer_to_hf(cfg),
        "rope_scaling": rope_to_hf(cfg.rope_scaling),
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": "bfloat16",
        "eos_token_id": cfg.eos_token_id,
    }
    if cfg.aux_layer_ids is not None:
        out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(cfg.aux_layer_ids)}
    return out


def read_eagle3_config(model_dir: str | os.PathLike) -> Eagle3Config:
    """A draft head's config from ``model_dir/config.json``, whatever its format (:func:`parse_eagle3`)."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    return parse_eagle3(read_json(path), where=path)
