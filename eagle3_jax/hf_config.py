"""Hugging Face config I/O: ``config.json`` dicts in, config dataclasses out, and back.

The dataclasses and their checks are the schema (``eagle3_jax/config.py``);
this module parses and writes them. A config.json is untrusted input:
every key is read by a typed reader of ``eagle3_jax/hf_json.py`` (``json_int``,
``json_float``, ``json_bool``, ``json_ids``, ``json_mapping``), so that a value
of the wrong type or out of range is a :class:`ConfigError` naming the file
and the key, never a ``TypeError`` deep in model building. The rules:

* ``null`` is the same as an absent key: a required key is then missing, an
  optional one takes its default (as ``transformers`` treats it).
* Integers must be JSON integers: ``true`` (a bool is an int in Python), ``256.0``
  and ``"256"`` are refused, not coerced.
* Floats must be finite (Python's ``json`` accepts ``NaN`` and ``Infinity``).
* Booleans must be ``true`` or ``false`` (``"no"`` is not false).
* Unknown keys are ignored: HF configs carry many that do not matter here.

Which parser reads a target's config.json is decided by its ``model_type``
through the registry (``eagle3_jax/models/registry.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from eagle3_jax.config import (
    MAX_HEAD_DIM,
    MAX_RMS_NORM_EPS,
    MAX_ROPE_THETA,
    MIN_ROPE_THETA,
    SIZE_LIMITS,
    SUPPORTED_ROPE_TYPES,
    Eagle3Config,
    LlamaConfig,
    Qwen3Config,
    RopeScaling,
    TargetConfig,
)
from eagle3_jax.errors import ConfigError
from eagle3_jax.hf_json import (
    json_bool,
    json_float,
    json_id,
    json_ids,
    json_int,
    json_mapping,
    json_object,
    json_require,
    read_json,
)
from eagle3_jax.validation import field_fail, field_float, field_int, show


def _eos_in_vocabulary(ids: tuple[int, ...], vocab_size: int, where: str) -> tuple[int, ...]:
    """``ids`` (eos ids read from ``where``), refused when one lies outside the vocabulary (generation would never
    stop on it)."""
    outside = [t for t in ids if t >= vocab_size]
    if outside:
        raise ConfigError(f"{where}: eos_token_id {outside[0]} is outside the vocabulary [0, {vocab_size}) "
                          f"(vocab_size={vocab_size})")
    return ids


def check_act(raw: Mapping[str, Any], where: str) -> None:
    act = raw.get("hidden_act")
    if act is not None and act != "silu":
        raise ConfigError(f"{where}: hidden_act {show(act)} is not supported (only 'silu')")


def _rope_settings(raw: Mapping[str, Any], where: str,
                   default_theta: float | None = None) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either the transformers-4 or -5 spelling.

    transformers 4 writes ``rope_theta`` and ``rope_scaling`` at the top level;
    transformers 5 writes ``rope_parameters: {rope_theta, rope_type, ...}``.
    Scaling types other than ``default`` and ``llama3`` are refused. A missing
    rope_theta is an error unless ``default_theta`` is given (Llama configs
    before 3 and the EAGLE authors' heads leave it out: 10000).
    """
    params = json_mapping(raw, "rope_parameters", where)
    key, theta = "rope_theta", raw.get("rope_theta")
    if theta is None and params is not None:
        key, theta = "rope_parameters.rope_theta", params.get("rope_theta")
    if theta is None:
        theta = default_theta
    if theta is None:
        raise ConfigError(f"{where}: missing rope_theta (neither 'rope_theta' nor 'rope_parameters.rope_theta' is set)")
    theta = field_float(theta, key, MIN_ROPE_THETA, MAX_ROPE_THETA, where=where)
    scaling = None
    for key in ("rope_scaling", "rope_parameters"):
        spec = json_mapping(raw, key, where)
        if not spec:
            continue
        rope_type = spec.get("rope_type")
        if rope_type is None:
            rope_type = spec.get("type")
        if rope_type is None:
            rope_type = "default"
        if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{where}: {key} asks for rope type {show(rope_type)}, which is not implemented "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)}). Remove the scaling from config.json "
                "to run at the model's native context length."
            )
        if rope_type == "llama3" and scaling is None:
            scaling = _llama3_scaling(spec, f"{where}: {key}")
    return theta, scaling


def _llama3_scaling(spec: Mapping[str, Any], where: str) -> RopeScaling:
    """The ``llama3`` RoPE scaling parameters (all four keys are required, as in transformers)."""
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if spec.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: rope type 'llama3' needs {', '.join(keys)}; missing: {', '.join(missing)}")
    try:
        return RopeScaling(
            rope_type="llama3",
            factor=json_float(spec, "factor", where, 0.0, 1e6),
            low_freq_factor=json_float(spec, "low_freq_factor", where, 0.0, 1e6),
            high_freq_factor=json_float(spec, "high_freq_factor", where, 0.0, 1e6),
            original_max_position_embeddings=json_int(spec, "original_max_position_embeddings", where,
                                                  hi=SIZE_LIMITS["max_position_embeddings"]),
        )
    except ConfigError as e:
        if str(e).startswith(f"{where}"):
            raise
        raise ConfigError(f"{where}: {e}") from None


def rope_to_hf(scaling: RopeScaling | None) -> dict[str, Any] | None:
    """``rope_scaling`` as transformers 4 writes it (transformers 5 reads it too)."""
    if scaling is None:
        return None
    return {"rope_type": scaling.rope_type, "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings}


def _derived_head_dim(hidden: int, heads: int, where: str) -> int:
    """hidden_size // num_attention_heads, for a config without head_dim (as transformers derives it)."""
    head_dim = hidden // heads
    if not 1 <= head_dim <= MAX_HEAD_DIM or head_dim % 2:
        raise ConfigError(f"{where}: head_dim is not set and hidden_size ({hidden}) // num_attention_heads ({heads}) "
                          f"= {head_dim} is not a usable head_dim (an even integer from 2 to {MAX_HEAD_DIM}); "
                          "set head_dim")
    return head_dim


def _attention_sizes(raw: Mapping[str, Any], where: str) -> tuple[int, int, int]:
    """(hidden_size, num_attention_heads, head_dim); head_dim defaults to hidden_size // heads."""
    hidden = json_int(raw, "hidden_size", where)
    heads = json_int(raw, "num_attention_heads", where)
    head_dim = json_int(raw, "head_dim", where, default=None)
    if head_dim is None:
        head_dim = _derived_head_dim(hidden, heads, where)
    return hidden, heads, head_dim







# ------------------------------------------------------------------ targets


def _check_full_attention(raw: Mapping[str, Any], where: str) -> None:
    if json_bool(raw, "use_sliding_window", where):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported (sliding-window attention)")
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            field_fail(where, "layer_types", "a list of strings", layer_types)
        if any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"{where}: only full_attention layers are supported, "
                              f"got layer_types={show(sorted(set(layer_types)))}")


def layer_fields(raw: Mapping[str, Any], where: str, default_theta: float | None = None) -> dict[str, Any]:
    """The decoder-layer fields targets and draft heads share (Llama-style attention, RoPE,
    RMSNorm), read from a config.json dict; :func:`_layer_to_hf` writes them back."""
    hidden, heads, head_dim = _attention_sizes(raw, where)
    theta, scaling = _rope_settings(raw, where, default_theta)
    return dict(
        hidden_size=hidden,
        intermediate_size=json_int(raw, "intermediate_size", where),
        num_attention_heads=heads,
        num_key_value_heads=json_int(raw, "num_key_value_heads", where, default=heads),
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=json_float(raw, "rms_norm_eps", where, 0.0, MAX_RMS_NORM_EPS, hi_open=True, default=1e-6),
        max_position_embeddings=json_int(raw, "max_position_embeddings", where, default=32768),
        bos_token_id=json_id(raw, "bos_token_id", where),
    )


def layer_to_hf(cfg: TargetConfig | Eagle3Config) -> dict[str, Any]:
    """The fields :func:`_layer_fields` reads, as config.json writes them (``rope_scaling`` aside)."""
    return {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
    }


def _target_fields(raw: Mapping[str, Any], where: str, generation_config: Mapping[str, Any] | None,
                   generation_where: str, default_theta: float | None = None) -> dict[str, Any]:
    """The fields every decoder-only target shares, read from config.json (+ generation_config.json)."""
    json_require(raw, where, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads"))
    check_act(raw, where)
    layer = layer_fields(raw, where, default_theta)
    vocab_size = json_int(raw, "vocab_size", where)
    eos = _eos_in_vocabulary(json_ids(raw, "eos_token_id", where), vocab_size, where)
    if generation_config is not None:
        json_object(generation_config, generation_where)
        extra = json_ids(generation_config, "eos_token_id", generation_where)
        for t in _eos_in_vocabulary(extra, vocab_size, generation_where):
            if t not in eos:
                eos = eos + (t,)
    return dict(
        **layer,
        vocab_size=vocab_size,
        num_hidden_layers=json_int(raw, "num_hidden_layers", where),
        tie_word_embeddings=json_bool(raw, "tie_word_embeddings", where),
        eos_token_ids=eos,
        pad_token_id=json_id(raw, "pad_token_id", where),
    )


def build_config(cls, where: str, **fields):
    """``cls(**fields)`` with a constructor error prefixed by the file it came from."""
    try:
        return cls(**fields)
    except ConfigError as e:
        if str(e).startswith(f"{where}: "):
            raise
        raise ConfigError(f"{where}: {e}") from None


def check_model_type(raw: Mapping[str, Any], where: str, supported: tuple[str, ...]) -> str:
    """``raw``'s model_type if it is one of ``supported``, else a ConfigError naming ``where``."""
    json_object(raw, where)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in supported:
        raise ConfigError(f"{where}: unknown model_type {show(model_type)}; eagle3-jax supports "
                          f"{', '.join(supported)} targets")
    return model_type


def parse_qwen3(raw: Mapping[str, Any], where: str = "config.json",
                generation_config: Mapping[str, Any] | None = None, *,
                generation_where: str = "generation_config.json") -> Qwen3Config:
    """Parses an HF ``config.json`` dict of a ``qwen3`` or ``qwen2`` model.

    ``generation_config`` (the model's generation_config.json, if any) adds
    its ``eos_token_id`` entries to the stop ids. ``where`` and
    ``generation_where`` name the two files in error messages.

    Raises:
      ConfigError: a key is missing, of the wrong type, out of range (see
        the ``MAX_*`` limits of ``eagle3_jax.config``) or asks for something unsupported.
    """
    model_type = check_model_type(raw, where, Qwen3Config.MODEL_TYPES)
    _check_full_attention(raw, where)
    fields = _target_fields(raw, where, generation_config, generation_where)
    if model_type == "qwen3":
        bias = json_bool(raw, "attention_bias", where)
        flags = dict(qkv_bias=bias, o_bias=bias, qk_norm=True)
    else:  # qwen2: q/k/v biases, no o bias, no q/k norm
        flags = dict(qkv_bias=True, o_bias=False, qk_norm=False)
    return build_config(Qwen3Config, where, model_type=model_type, **fields, **flags)


LLAMA_DEFAULT_ROPE_THETA = 10000.0


def parse_llama(raw: Mapping[str, Any], where: str = "config.json",
                generation_config: Mapping[str, Any] | None = None, *,
                generation_where: str = "generation_config.json") -> LlamaConfig:
    """Parses an HF ``config.json`` dict of a ``llama`` model (Llama 2, 3, 3.1, 3.2, 3.3).

    ``attention_bias`` puts biases on q, k, v and o (as HF ``LlamaAttention``);
    ``mlp_bias`` is refused; ``rope_scaling`` of type ``llama3`` is honoured.
    Otherwise as :func:`parse_qwen3`.
    """
    check_model_type(raw, where, LlamaConfig.MODEL_TYPES)
    if json_bool(raw, "mlp_bias", where):
        raise ConfigError(f"{where}: mlp_bias=true is not supported")
    if raw.get("pretraining_tp") is not None:  # HF's forward ignores it; only its type is checked
        field_int(raw["pretraining_tp"], "pretraining_tp", 1, 1 << 16, where)
    # transformers' LlamaConfig defaults rope_theta to 10000; Llama 2 configs (and Vicuna's) leave it out
    fields = _target_fields(raw, where, generation_config, generation_where, default_theta=LLAMA_DEFAULT_ROPE_THETA)
    bias = json_bool(raw, "attention_bias", where)
    return build_config(LlamaConfig, where, **fields, qkv_bias=bias, o_bias=bias, qk_norm=False)


def read_generation_config(model_dir: str) -> tuple[dict[str, Any] | None, str]:
    """(generation_config.json of ``model_dir`` or None when absent, its path)."""
    gen_path = os.path.join(model_dir, "generation_config.json")
    return (read_json(gen_path) if os.path.exists(gen_path) else None), gen_path


def target_to_hf(cfg: TargetConfig) -> dict[str, Any]:
    """A target config as an HF ``config.json`` dict that ``transformers`` can load."""
    architectures = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
    out: dict[str, Any] = {
        "architectures": [architectures[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        **layer_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = rope_to_hf(cfg.rope_scaling)
    if cfg.model_type in ("qwen3", "qwen2"):
        out["use_sliding_window"] = False
    if cfg.model_type in ("qwen3", "llama"):
        out["attention_bias"] = cfg.qkv_bias
    if cfg.model_type == "llama":
        out["mlp_bias"] = False
    if cfg.pad_token_id is not None:
        out["pad_token_id"] = cfg.pad_token_id
    return out

