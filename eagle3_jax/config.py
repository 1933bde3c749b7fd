"""Model configs: frozen, hashable dataclasses parsed from Hugging Face config.json.

A config is a static argument of every jitted function, so it must be hashable
and immutable; every field that changes a compiled shape lives here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from eagle3_jax.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2")

# RoPE variants implemented by ``eagle3_jax.models.layers.rope_inv_freq``.
SUPPORTED_ROPE_TYPES = ("default",)


def _rope_settings(raw: Mapping[str, Any], where: str) -> float:
    """Returns rope_theta from either the transformers-4 or -5 spelling.

    transformers 4 writes ``rope_theta`` (and ``rope_scaling``) at the top level;
    transformers 5 writes ``rope_parameters: {rope_theta, rope_type}``.
    """
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError(f"{where}: rope_parameters must be an object, got {params!r}")
    theta = raw.get("rope_theta")
    if theta is None and params is not None:
        theta = params.get("rope_theta")
    if theta is None:
        raise ConfigError(f"{where}: missing rope_theta (neither 'rope_theta' nor 'rope_parameters.rope_theta' is set)")
    for key in ("rope_scaling", "rope_parameters"):
        scaling = raw.get(key)
        if not scaling:
            continue
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{where}: {key} asks for rope type {rope_type!r}, which is not implemented "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)}). Remove the scaling from config.json "
                "to run at the model's native context length."
            )
    return float(theta)


def _as_id_tuple(value: Any, where: str, key: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be an int or a list of ints, got {value!r}")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: {key} must be an int or a list of ints, got {value!r}")


def _check_shapes(cfg, positive_fields: tuple[str, ...]) -> None:
    """The checks every attention config shares: positive sizes, grouped heads, an even head_dim, a RoPE base."""
    for name in positive_fields:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
                          f"num_key_value_heads ({cfg.num_key_value_heads})")
    if cfg.head_dim % 2:
        raise ConfigError(f"head_dim must be even for RoPE, got {cfg.head_dim}")
    if not cfg.rope_theta > 0:
        raise ConfigError(f"rope_theta must be positive, got {cfg.rope_theta}")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a JSON object from ``path`` with a clear error for a missing or broken file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture of a Qwen3 (or Qwen2) causal LM, as in HF ``config.json``.

    Qwen2 is the same network with biases on q/k/v and without the per-head
    q/k RMSNorm, expressed by ``qkv_bias=True, qk_norm=False``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = True
    model_type: str = "qwen3"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        _check_shapes(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                             "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unknown model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")

    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def default_feature_layers(self) -> tuple[int, int, int]:
        """EAGLE-3 feature layers: inputs of layers [2, L//2, L-3] (HF hidden_states indices)."""
        n = self.num_hidden_layers
        return (2, n // 2, n - 3)

    # ------------------------------------------------------------------ parsing

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], where: str = "config.json",
                     generation_config: Mapping[str, Any] | None = None) -> "Qwen3Config":
        """Parses an HF ``config.json`` dict of a ``qwen3`` or ``qwen2`` model.

        ``generation_config`` (the model's generation_config.json, if any) adds
        its ``eos_token_id`` entries to the stop ids.
        """
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: unknown model_type {model_type!r}; eagle3-jax supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} targets"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if raw.get(k) is None]
        if missing:
            raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{where}: use_sliding_window=true is not supported (sliding-window attention)")
        layer_types = raw.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"{where}: only full_attention layers are supported, got layer_types={sorted(set(layer_types))}")

        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        eos = _as_id_tuple(raw.get("eos_token_id"), where, "eos_token_id")
        if generation_config:
            for t in _as_id_tuple(generation_config.get("eos_token_id"), where, "generation_config eos_token_id"):
                if t not in eos:
                    eos = eos + (t,)
        if model_type == "qwen3":
            bias = bool(raw.get("attention_bias", False))
            qkv_bias, o_bias, qk_norm = bias, bias, True
        else:  # qwen2: q/k/v biases, no o bias, no q/k norm
            qkv_bias, o_bias, qk_norm = True, False, False
        try:
            return cls(
                model_type=model_type,
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads") or heads,
                head_dim=head_dim,
                rope_theta=_rope_settings(raw, where),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=raw.get("max_position_embeddings", 32768),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                qk_norm=qk_norm,
                eos_token_ids=eos,
                bos_token_id=raw.get("bos_token_id"),
                pad_token_id=raw.get("pad_token_id"),
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "Qwen3Config":
        """Reads ``config.json`` (and ``generation_config.json`` if present) from a model directory."""
        model_dir = os.fspath(model_dir)
        path = os.path.join(model_dir, "config.json")
        gen_path = os.path.join(model_dir, "generation_config.json")
        gen = read_json(gen_path) if os.path.exists(gen_path) else None
        return cls.from_hf_dict(read_json(path), where=path, generation_config=gen)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as an HF ``config.json`` dict that ``transformers`` can load."""
        arch = "Qwen3ForCausalLM" if self.model_type == "qwen3" else "Qwen2ForCausalLM"
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.model_type == "qwen3":
            out["attention_bias"] = self.qkv_bias
        if self.pad_token_id is not None:
            out["pad_token_id"] = self.pad_token_id
        return out

    # ------------------------------------------------------- known checkpoints

    @classmethod
    def qwen3_4b_thinking_2507(cls) -> "Qwen3Config":
        """Qwen/Qwen3-4B-Thinking-2507 (also the shape of Qwen3-4B and -Instruct-2507)."""
        return cls(
            vocab_size=151936,
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rope_theta=5_000_000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=262144,
            tie_word_embeddings=True,
            eos_token_ids=(151645, 151643),
            bos_token_id=151643,
        )


EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """An EAGLE-3 draft head (SpecForge ``LlamaForCausalLMEagle3`` config.json).

    One Llama decoder layer whose attention reads ``[input_layernorm(emb),
    hidden_norm(h)]`` (2H wide), ``fc`` from the target's three concatenated
    feature layers to H, and ``lm_head`` over a reduced draft vocabulary
    mapped to target ids by ``d2t``.

    Attributes:
      aux_layer_ids: ``eagle_config.eagle_aux_hidden_state_layer_ids`` as
        written in config.json (None: the target's default layers). The
        features are taken at the *inputs* of layers ``id + 1``.
      rope_theta: the draft's RoPE base. Some published heads were trained
        with 10000 whatever their config says; override it when loading
        (``rope_theta=`` / ``--draft-rope-theta``) if acceptance is poor.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    rope_theta: float
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    aux_layer_ids: tuple[int, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        _check_shapes(self, ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                             "head_dim", "vocab_size", "draft_vocab_size", "target_hidden_size",
                             "max_position_embeddings"))
        if self.draft_vocab_size > self.vocab_size:
            raise ConfigError(f"draft_vocab_size ({self.draft_vocab_size}) exceeds vocab_size ({self.vocab_size})")

    def feature_layers(self, target: Qwen3Config) -> tuple[int, ...]:
        """The target layers whose inputs feed ``fc`` (HF hidden_states indices)."""
        if self.aux_layer_ids is None:
            return target.default_feature_layers
        return tuple(i + 1 for i in self.aux_layer_ids)

    def with_overrides(self, *, rope_theta: float | None = None,
                       feature_layers: tuple[int, ...] | None = None) -> "Eagle3Config":
        """A copy with the known pitfalls of published heads corrected.

        ``feature_layers`` are HF hidden_states indices (inputs of layers), so
        ``(2, 18, 33)`` is the default for a 36-layer target.
        """
        cfg = self
        if rope_theta is not None:
            cfg = dataclasses.replace(cfg, rope_theta=float(rope_theta))
        if feature_layers is not None:
            cfg = dataclasses.replace(cfg, aux_layer_ids=tuple(int(i) - 1 for i in feature_layers))
        return cfg

    def check_target(self, target: Qwen3Config, *, where: str = "draft") -> None:
        """Raises ConfigError unless this head can run on ``target``."""
        problems = []
        if self.target_hidden_size != target.hidden_size:
            problems.append(f"the head reads features of width {self.target_hidden_size} (target_hidden_size) "
                            f"but the target's hidden_size is {target.hidden_size}")
        if self.hidden_size != target.hidden_size:
            problems.append(f"the head's hidden_size {self.hidden_size} differs from the target's "
                            f"{target.hidden_size}, so it can not share the target's embedding")
        if self.vocab_size != target.vocab_size:
            problems.append(f"the head's vocab_size {self.vocab_size} differs from the target's {target.vocab_size}")
        layers = self.feature_layers(target)
        if len(layers) != 3:
            problems.append(f"EAGLE-3 needs 3 feature layers, got {list(layers)}")
        bad = [i for i in layers if not 0 <= i < target.num_hidden_layers]
        if bad:
            problems.append(f"feature layers {bad} are outside the target's {target.num_hidden_layers} layers "
                            f"(valid: 0..{target.num_hidden_layers - 1})")
        if problems:
            raise ConfigError(f"{where} does not match the target: " + "; ".join(problems))

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], where: str = "config.json") -> "Eagle3Config":
        archs = raw.get("architectures") or []
        if not any(a in EAGLE3_ARCHITECTURES for a in archs):
            raise ConfigError(f"{where}: not an EAGLE-3 draft head (architectures={archs}; "
                              f"expected one of {', '.join(EAGLE3_ARCHITECTURES)})")
        required = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
        missing = [k for k in required if raw.get(k) is None]
        if missing:
            raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
        if raw.get("num_hidden_layers", 1) != 1:
            raise ConfigError(f"{where}: only single-layer EAGLE-3 heads are supported "
                              f"(num_hidden_layers={raw.get('num_hidden_layers')})")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act {raw.get('hidden_act')!r} is not supported (only 'silu')")
        for flag in ("fc_norm", "attention_bias", "bias", "tie_word_embeddings"):
            if raw.get(flag):
                raise ConfigError(f"{where}: {flag}=true is not supported for EAGLE-3 heads")
        eagle = raw.get("eagle_config") or {}
        ids = eagle.get("eagle_aux_hidden_state_layer_ids")
        if ids is not None:
            ids = _as_id_tuple(ids, where, "eagle_config.eagle_aux_hidden_state_layer_ids")
        heads = raw["num_attention_heads"]
        eos = _as_id_tuple(raw.get("eos_token_id"), where, "eos_token_id")
        try:
            return cls(
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads") or heads,
                head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
                vocab_size=raw["vocab_size"],
                draft_vocab_size=raw.get("draft_vocab_size") or raw["vocab_size"],
                target_hidden_size=raw.get("target_hidden_size") or raw["hidden_size"],
                rope_theta=_rope_settings(raw, where),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=raw.get("max_position_embeddings", 32768),
                aux_layer_ids=ids,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=eos[0] if eos else None,
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "Eagle3Config":
        path = os.path.join(os.fspath(model_dir), "config.json")
        return cls.from_hf_dict(read_json(path), where=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in the format SpecForge, SGLang and vLLM load."""
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "num_hidden_layers": 1,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "torch_dtype": "bfloat16",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.aux_layer_ids is not None:
            out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids)}
        return out

    @classmethod
    def for_target(cls, target: Qwen3Config, *, draft_vocab_size: int = 32000,
                   feature_layers: tuple[int, ...] | None = None) -> "Eagle3Config":
        """A new head shaped like SpecForge's default for ``target`` (for training)."""
        layers = feature_layers or target.default_feature_layers
        return cls(hidden_size=target.hidden_size, intermediate_size=target.intermediate_size,
                   num_attention_heads=target.num_attention_heads, num_key_value_heads=target.num_key_value_heads,
                   head_dim=target.head_dim, vocab_size=target.vocab_size,
                   draft_vocab_size=min(draft_vocab_size, target.vocab_size), target_hidden_size=target.hidden_size,
                   rope_theta=target.rope_theta, rms_norm_eps=target.rms_norm_eps,
                   max_position_embeddings=target.max_position_embeddings,
                   aux_layer_ids=tuple(i - 1 for i in layers), bos_token_id=target.bos_token_id,
                   eos_token_id=target.eos_token_ids[0] if target.eos_token_ids else None)
