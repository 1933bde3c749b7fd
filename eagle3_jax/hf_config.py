"""Hugging Face config I/O: ``config.json`` dicts in, config dataclasses out, and back.

The dataclasses and their checks are the schema (``eagle3_jax/config.py``);
this module reads and writes the files. A config.json is untrusted input.
Every key is read by one of the small typed readers below (``_int``,
``_float``, ``_bool``, ``_ids``, ``_mapping``), shared by every parser, so
that a value of the wrong type or out of range is a :class:`ConfigError`
naming the file and the key, never a ``TypeError`` deep in model building.
The rules:

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

import json
import os
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from eagle3_jax.config import (
    _REQUIRED,
    _SIZE_LIMITS,
    MAX_HEAD_DIM,
    MAX_JSON_BYTES,
    MAX_LAYERS,
    MAX_RMS_NORM_EPS,
    MAX_ROPE_THETA,
    MAX_TOKEN_ID,
    MIN_AUX_LAYER_ID,
    MIN_ROPE_THETA,
    SUPPORTED_ROPE_TYPES,
    Eagle3Config,
    LlamaConfig,
    Qwen3Config,
    RopeScaling,
    TargetConfig,
    _check_bool,
    _check_float,
    _check_ids,
    _check_int,
    _describe,
    _fail,
    _show,
)
from eagle3_jax.errors import ConfigError


def _check_object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {_describe(value)}")
    return value


def _get(raw: Mapping[str, Any], key: str, where: str, default: Any) -> Any:
    """``raw[key]``; null counts as absent: ``default``, or an error if the key is required."""
    value = raw.get(key)
    if value is None and default is _REQUIRED:
        raise ConfigError(f"{where}: missing required key(s): {key}")
    return value


def _int(raw: Mapping[str, Any], key: str, where: str, *, lo: int = 1, hi: int | None = None,
         default: Any = _REQUIRED) -> Any:
    """An integer ``raw[key]`` in ``[lo, hi]`` (``hi`` defaults to the key's size limit)."""
    value = _get(raw, key, where, default)
    if value is None:
        return default
    return _check_int(value, key, lo, _SIZE_LIMITS[key] if hi is None else hi, where)


def _float(raw: Mapping[str, Any], key: str, where: str, lo: float, hi: float, *, lo_open: bool = True,
           hi_open: bool = False, default: Any = _REQUIRED) -> Any:
    value = _get(raw, key, where, default)
    if value is None:
        return default
    return _check_float(value, key, lo, hi, lo_open=lo_open, hi_open=hi_open, where=where)


def _bool(raw: Mapping[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = raw.get(key)
    return default if value is None else _check_bool(value, key, where)


def _ids(raw: Mapping[str, Any], key: str, where: str, *, name: str | None = None, lo: int = 0,
         hi: int = MAX_TOKEN_ID) -> tuple[int, ...]:
    """Token ids (or layer ids): an int or a list of ints; null or absent is ()."""
    return _check_ids(raw.get(key), name or key, where, lo=lo, hi=hi)


def _id(raw: Mapping[str, Any], key: str, where: str) -> int | None:
    """One token id, or None."""
    value = raw.get(key)
    return None if value is None else _check_int(value, key, 0, MAX_TOKEN_ID, where)


def _mapping(raw: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any] | None:
    """A JSON object ``raw[key]``, or None if it is null or absent."""
    value = raw.get(key)
    if value is not None and not isinstance(value, Mapping):
        _fail(where, key, "a JSON object", value)
    return value


def _eos_in_vocabulary(ids: tuple[int, ...], vocab_size: int, where: str) -> tuple[int, ...]:
    """``ids`` (eos ids read from ``where``), refused when one lies outside the vocabulary (generation would never
    stop on it)."""
    outside = [t for t in ids if t >= vocab_size]
    if outside:
        raise ConfigError(f"{where}: eos_token_id {outside[0]} is outside the vocabulary [0, {vocab_size}) "
                          f"(vocab_size={vocab_size})")
    return ids


def _check_act(raw: Mapping[str, Any], where: str) -> None:
    act = raw.get("hidden_act")
    if act is not None and act != "silu":
        raise ConfigError(f"{where}: hidden_act {_show(act)} is not supported (only 'silu')")


def _rope_settings(raw: Mapping[str, Any], where: str,
                   default_theta: float | None = None) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either the transformers-4 or -5 spelling.

    transformers 4 writes ``rope_theta`` and ``rope_scaling`` at the top level;
    transformers 5 writes ``rope_parameters: {rope_theta, rope_type, ...}``.
    Scaling types other than ``default`` and ``llama3`` are refused. A missing
    rope_theta is an error unless ``default_theta`` is given (Llama configs
    before 3 and the EAGLE authors' heads leave it out: 10000).
    """
    params = _mapping(raw, "rope_parameters", where)
    key, theta = "rope_theta", raw.get("rope_theta")
    if theta is None and params is not None:
        key, theta = "rope_parameters.rope_theta", params.get("rope_theta")
    if theta is None:
        theta = default_theta
    if theta is None:
        raise ConfigError(f"{where}: missing rope_theta (neither 'rope_theta' nor 'rope_parameters.rope_theta' is set)")
    theta = _check_float(theta, key, MIN_ROPE_THETA, MAX_ROPE_THETA, where=where)
    scaling = None
    for key in ("rope_scaling", "rope_parameters"):
        spec = _mapping(raw, key, where)
        if not spec:
            continue
        rope_type = spec.get("rope_type")
        if rope_type is None:
            rope_type = spec.get("type")
        if rope_type is None:
            rope_type = "default"
        if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{where}: {key} asks for rope type {_show(rope_type)}, which is not implemented "
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
            factor=_float(spec, "factor", where, 0.0, 1e6),
            low_freq_factor=_float(spec, "low_freq_factor", where, 0.0, 1e6),
            high_freq_factor=_float(spec, "high_freq_factor", where, 0.0, 1e6),
            original_max_position_embeddings=_int(spec, "original_max_position_embeddings", where,
                                                  hi=_SIZE_LIMITS["max_position_embeddings"]),
        )
    except ConfigError as e:
        if str(e).startswith(f"{where}"):
            raise
        raise ConfigError(f"{where}: {e}") from None


def _rope_to_hf(scaling: RopeScaling | None) -> dict[str, Any] | None:
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
    hidden = _int(raw, "hidden_size", where)
    heads = _int(raw, "num_attention_heads", where)
    head_dim = _int(raw, "head_dim", where, default=None)
    if head_dim is None:
        head_dim = _derived_head_dim(hidden, heads, where)
    return hidden, heads, head_dim


def _require(raw: Mapping[str, Any], where: str, keys: Iterable[str]) -> None:
    missing = [k for k in keys if raw.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a JSON object from ``path``; a missing, unreadable or broken file is a ConfigError naming it."""
    path = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: can not be read ({e.strerror or e})") from None
    if len(data) > MAX_JSON_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB, which is not a config file")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is tolerated
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text: {e})") from None
    if not text.strip():
        raise ConfigError(f"{path}: not valid JSON (the file is empty)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except ValueError:  # an integer literal longer than Python's int parsing limit (4300 digits)
        raise ConfigError(f"{path}: not valid JSON (a number with too many digits)") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {_describe(obj)}")
    return obj



# ------------------------------------------------------------------ targets


def _check_full_attention(raw: Mapping[str, Any], where: str) -> None:
    if _bool(raw, "use_sliding_window", where):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported (sliding-window attention)")
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            _fail(where, "layer_types", "a list of strings", layer_types)
        if any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"{where}: only full_attention layers are supported, "
                              f"got layer_types={_show(sorted(set(layer_types)))}")


def _layer_fields(raw: Mapping[str, Any], where: str, default_theta: float | None = None) -> dict[str, Any]:
    """The decoder-layer fields targets and draft heads share (Llama-style attention, RoPE,
    RMSNorm), read from a config.json dict; :func:`_layer_to_hf` writes them back."""
    hidden, heads, head_dim = _attention_sizes(raw, where)
    theta, scaling = _rope_settings(raw, where, default_theta)
    return dict(
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size", where),
        num_attention_heads=heads,
        num_key_value_heads=_int(raw, "num_key_value_heads", where, default=heads),
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=_float(raw, "rms_norm_eps", where, 0.0, MAX_RMS_NORM_EPS, hi_open=True, default=1e-6),
        max_position_embeddings=_int(raw, "max_position_embeddings", where, default=32768),
        bos_token_id=_id(raw, "bos_token_id", where),
    )


def _layer_to_hf(cfg: TargetConfig | Eagle3Config) -> dict[str, Any]:
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
    _require(raw, where, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads"))
    _check_act(raw, where)
    layer = _layer_fields(raw, where, default_theta)
    vocab_size = _int(raw, "vocab_size", where)
    eos = _eos_in_vocabulary(_ids(raw, "eos_token_id", where), vocab_size, where)
    if generation_config is not None:
        _check_object(generation_config, generation_where)
        extra = _ids(generation_config, "eos_token_id", generation_where)
        for t in _eos_in_vocabulary(extra, vocab_size, generation_where):
            if t not in eos:
                eos = eos + (t,)
    return dict(
        **layer,
        vocab_size=vocab_size,
        num_hidden_layers=_int(raw, "num_hidden_layers", where),
        tie_word_embeddings=_bool(raw, "tie_word_embeddings", where),
        eos_token_ids=eos,
        pad_token_id=_id(raw, "pad_token_id", where),
    )


def _build(cls, where: str, **fields):
    """``cls(**fields)`` with a constructor error prefixed by the file it came from."""
    try:
        return cls(**fields)
    except ConfigError as e:
        if str(e).startswith(f"{where}: "):
            raise
        raise ConfigError(f"{where}: {e}") from None


def check_model_type(raw: Mapping[str, Any], where: str, supported: tuple[str, ...]) -> str:
    """``raw``'s model_type if it is one of ``supported``, else a ConfigError naming ``where``."""
    _check_object(raw, where)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in supported:
        raise ConfigError(f"{where}: unknown model_type {_show(model_type)}; eagle3-jax supports "
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
        bias = _bool(raw, "attention_bias", where)
        flags = dict(qkv_bias=bias, o_bias=bias, qk_norm=True)
    else:  # qwen2: q/k/v biases, no o bias, no q/k norm
        flags = dict(qkv_bias=True, o_bias=False, qk_norm=False)
    return _build(Qwen3Config, where, model_type=model_type, **fields, **flags)


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
    if _bool(raw, "mlp_bias", where):
        raise ConfigError(f"{where}: mlp_bias=true is not supported")
    if raw.get("pretraining_tp") is not None:  # HF's forward ignores it; only its type is checked
        _check_int(raw["pretraining_tp"], "pretraining_tp", 1, 1 << 16, where)
    # transformers' LlamaConfig defaults rope_theta to 10000; Llama 2 configs (and Vicuna's) leave it out
    fields = _target_fields(raw, where, generation_config, generation_where, default_theta=LLAMA_DEFAULT_ROPE_THETA)
    bias = _bool(raw, "attention_bias", where)
    return _build(LlamaConfig, where, **fields, qkv_bias=bias, o_bias=bias, qk_norm=False)


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
        **_layer_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = _rope_to_hf(cfg.rope_scaling)
    if cfg.model_type in ("qwen3", "qwen2"):
        out["use_sliding_window"] = False
    if cfg.model_type in ("qwen3", "llama"):
        out["attention_bias"] = cfg.qkv_bias
    if cfg.model_type == "llama":
        out["mlp_bias"] = False
    if cfg.pad_token_id is not None:
        out["pad_token_id"] = cfg.pad_token_id
    return out


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
    _check_object(raw, where)
    if raw.get("speculators_model_type") is not None:
        kind = raw.get("speculators_model_type")
        if kind != "eagle3":
            raise ConfigError(f"{where}: a speculators model of type {_show(kind)}, not an EAGLE-3 head "
                              "(speculators_model_type must be 'eagle3')")
        return "speculators"
    archs = raw.get("architectures")
    names = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    if any(a in EAGLE3_ARCHITECTURES for a in names):
        return "specforge"
    if ("LlamaForCausalLM" in names and raw.get("draft_vocab_size") is not None and raw.get("num_hidden_layers") == 1
            and raw.get("target_hidden_size") is None and raw.get("eagle_config") is None):
        return "eagle"  # the EAGLE authors' config: a plain Llama config plus draft_vocab_size, no SpecForge keys
    raise ConfigError(f"{where}: not an EAGLE-3 draft head (architectures={_show(archs)}; expected one of "
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
    _require(raw, lw, ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"))
    layers = _int(raw, "num_hidden_layers", lw, default=1)
    if layers != 1:
        raise ConfigError(f"{lw}: only single-layer EAGLE-3 heads are supported (num_hidden_layers={layers})")
    _check_act(raw, lw)
    flags = ("fc_norm", "norm_before_fc", "norm_output", "attention_bias", "mlp_bias", "tie_word_embeddings")
    if not eagle_format:  # the EAGLE authors' config carries bias=true for EAGLE-1/2; their EAGLE-3 fc has none
        flags = flags + ("bias",)
    for flag in flags:
        if _bool(raw, flag, lw):
            raise ConfigError(f"{lw}: {flag}=true is not supported for EAGLE-3 heads")
    if aux_ids is None:
        eagle = _mapping(raw, "eagle_config", lw) or {}
        if eagle.get("eagle_aux_hidden_state_layer_ids") is not None:
            aux_ids = _ids(eagle, "eagle_aux_hidden_state_layer_ids", lw,
                           name="eagle_config.eagle_aux_hidden_state_layer_ids", lo=MIN_AUX_LAYER_ID,
                           hi=MAX_LAYERS - 2)
    layer = _layer_fields(raw, lw, EAGLE_DEFAULT_ROPE_THETA if eagle_format else None)
    vocab = _int(raw, "vocab_size", lw)
    eos = _ids(raw, "eos_token_id", lw)
    fields = dict(
        **layer,
        vocab_size=vocab,
        draft_vocab_size=_int(raw, "draft_vocab_size", lw, default=vocab),
        target_hidden_size=_int(raw, "target_hidden_size", lw, default=layer["hidden_size"]),
        aux_layer_ids=aux_ids,
        eos_token_id=eos[0] if eos else None,
    )
    fields.update(extra)
    return _build(Eagle3Config, where, **fields)


def _parse_speculators(raw: Mapping[str, Any], where: str) -> Eagle3Config:
    """A speculators ``Eagle3Speculator`` config: the layer's Llama config nested in
    ``transformer_layer_config``, the EAGLE-3 fields at the top."""
    layer = _mapping(raw, "transformer_layer_config", where)
    if layer is None:
        raise ConfigError(f"{where}: missing required key(s): transformer_layer_config")
    layer_where = f"{where}: transformer_layer_config"
    model_type = layer.get("model_type")
    if model_type is not None and model_type != "llama":
        raise ConfigError(f"{layer_where}: model_type {_show(model_type)} is not supported for the head's layer "
                          "(only 'llama')")
    for flag in ("norm_before_fc", "fc_norm", "norm_output"):
        if _bool(raw, flag, where):
            raise ConfigError(f"{where}: {flag}=true is not supported (eagle3-jax implements the EAGLE-3 head "
                              "without extra feature or output norms)")
    ids = raw.get("eagle_aux_hidden_state_layer_ids")
    aux = None
    if ids is not None:  # speculators: features at the INPUT of layer k (HF index k); stored as k - 1
        ids = _ids(raw, "eagle_aux_hidden_state_layer_ids", where, lo=0, hi=MAX_LAYERS - 1)
        aux = tuple(i - 1 for i in ids)
    merged = dict(layer)
    for key in ("draft_vocab_size", "target_hidden_size"):
        if raw.get(key) is not None:
            merged[key] = _int(raw, key, where)  # checked here, so an error names the top-level key
    return _parse_llama_head(merged, where, eagle_format=False, layer_where=layer_where, aux_ids=aux,
                             norm_before_residual=_bool(raw, "norm_before_residual", where))


def eagle3_to_hf(cfg: Eagle3Config) -> dict[str, Any]:
    """config.json in the SpecForge format (what SpecForge, SGLang and vLLM load)."""
    if cfg.norm_before_residual:
        raise ConfigError("a head with norm_before_residual=true has no SpecForge config.json spelling "
                          "(it is a speculators-format head)")
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        **_layer_to_hf(cfg),
        "rope_scaling": _rope_to_hf(cfg.rope_scaling),
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
