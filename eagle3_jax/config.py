"""Model configs: the schema. Frozen, hashable dataclasses with their checks.

A config is a static argument of every jitted function, so it must be hashable
and immutable; every field that changes a compiled shape lives here. This module
imports nothing of the project but its errors and checks: reading and writing
Hugging Face ``config.json`` files is ``eagle3_jax/hf_config.py``, and the
dispatch by ``model_type`` is the registry's (``read_target_config``).

The constructors check types and ranges, so a config built from Python is held
to the same rules as one read from a file (with the field names in the message).

Targets: :class:`TargetConfig` is what every decoder-only target shares;
:class:`Qwen3Config` (``qwen3``, ``qwen2``) and :class:`LlamaConfig` (``llama``)
are the architectures the registry (``eagle3_jax/models/registry.py``) knows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from eagle3_jax.errors import ConfigError
from eagle3_jax.validation import field_bool, field_fail, field_float, field_ids, field_indices, field_int, show

# model_type values of the Qwen family (Qwen3Config); every target type is in the registry.
SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2")

# RoPE variants implemented by ``eagle3_jax.models.layers.rope_inv_freq``.
SUPPORTED_ROPE_TYPES = ("default", "llama3")

# ------------------------------------------------------------------ limits
#
# Bounds on what a config may ask for. Without them a typo is not an error but
# a hang or an out-of-memory: ``num_hidden_layers: 1000000`` builds a million
# layers, ``vocab_size: 10**12`` asks for terabytes of embedding. Each bound is
# generous: far above every published Qwen3 / Qwen2 / Llama checkpoint, the
# largest of which are
#   Qwen3-235B-A22B   94 layers, 64 query / 4 KV heads, hidden 4096, head_dim 128,
#                     vocab 151936, max_position_embeddings 40960 (262144 for -2507)
#   Qwen2.5-72B       80 layers, 64 / 8 heads, hidden 8192, intermediate 29568, vocab 152064
#   Llama-3.1-405B    126 layers, 128 / 8 heads, hidden 16384, intermediate 53248, vocab 128256
# They bound each value on its own; a config within them can still be too big
# for the machine it is loaded on.
MAX_LAYERS = 1024  # num_hidden_layers (largest published: 126)
MAX_HEADS = 1024  # num_attention_heads, num_key_value_heads (largest: 128)
MAX_HIDDEN_SIZE = 2**17  # hidden_size, target_hidden_size: 131072 (largest: 16384)
MAX_INTERMEDIATE_SIZE = 2**17  # intermediate_size: 131072 (largest: 53248)
MAX_HEAD_DIM = 1024  # head_dim (largest: 256)
MAX_VOCAB_SIZE = 2**24  # vocab_size, draft_vocab_size: 16.7M (largest: 262144)
MAX_TOKEN_ID = MAX_VOCAB_SIZE - 1  # bos / eos / pad token ids are in [0, MAX_TOKEN_ID]
MAX_POSITIONS = 2**24  # max_position_embeddings: 16.7M (Qwen3-2507: 262144; Llama 4 Scout: 10M)
# rope_theta is a RoPE base, used in float32: it must be > 1 for the rotation
# frequencies to decrease, and published bases are 1e4 to about 1e8.
MIN_ROPE_THETA = 1.0  # exclusive
MAX_ROPE_THETA = 1e12
# rms_norm_eps is added to a mean square: positive, and far below 1 (published: 1e-6, 1e-5).
MAX_RMS_NORM_EPS = 1.0  # exclusive
# EAGLE-3 aux layer ids: the features are the inputs of layers id + 1, so -1 is
# the embedding output (hidden_states[0]) and the largest is MAX_LAYERS - 2.
MIN_AUX_LAYER_ID = -1
# read_json refuses files larger than this (a config.json is a few KB).
MAX_JSON_BYTES = 64 * 2**20

# The upper bound of each integer size field (all of them are >= 1).
SIZE_LIMITS = {
    "vocab_size": MAX_VOCAB_SIZE,
    "draft_vocab_size": MAX_VOCAB_SIZE,
    "hidden_size": MAX_HIDDEN_SIZE,
    "target_hidden_size": MAX_HIDDEN_SIZE,
    "intermediate_size": MAX_INTERMEDIATE_SIZE,
    "num_hidden_layers": MAX_LAYERS,
    "num_attention_heads": MAX_HEADS,
    "num_key_value_heads": MAX_HEADS,
    "head_dim": MAX_HEAD_DIM,
    "max_position_embeddings": MAX_POSITIONS,
}

def _check_feature_layers(layers: Any, key: str) -> tuple[int, ...]:
    """HF hidden_states indices (inputs of layers): ints (or numpy ints) from 0 to MAX_LAYERS - 1."""
    return field_indices(layers, key, MAX_LAYERS)


def _check_shapes(cfg, size_fields: tuple[str, ...]) -> None:
    """The checks every attention config shares: sizes in range, grouped heads, an even head_dim, a RoPE base.

    Also normalises ``rope_theta`` and ``rms_norm_eps`` to float (an int is accepted).
    """
    for name in size_fields:
        field_int(getattr(cfg, name), name, 1, SIZE_LIMITS[name])
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
                          f"num_key_value_heads ({cfg.num_key_value_heads})")
    if cfg.head_dim % 2:
        raise ConfigError(f"head_dim must be even for RoPE, got {cfg.head_dim}")
    object.__setattr__(cfg, "rope_theta", field_float(cfg.rope_theta, "rope_theta", MIN_ROPE_THETA, MAX_ROPE_THETA))
    object.__setattr__(cfg, "rms_norm_eps",
                       field_float(cfg.rms_norm_eps, "rms_norm_eps", 0.0, MAX_RMS_NORM_EPS, hi_open=True))


def _check_optional_id(value: Any, name: str) -> None:
    if value is not None:
        field_int(value, name, 0, MAX_TOKEN_ID)



def _check_rope_scaling(scaling: Any) -> None:
    if scaling is not None and not isinstance(scaling, RopeScaling):
        field_fail(None, "rope_scaling", "a RopeScaling or None", scaling)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_scaling`` / ``rope_parameters`` in config.json).

    Only ``llama3`` (Llama 3.1 and later) is implemented: wavelengths longer
    than ``original_max_position_embeddings / low_freq_factor`` are divided by
    ``factor``, those shorter than ``.../ high_freq_factor`` are kept, and the
    band between is interpolated smoothly (``eagle3_jax/models/layers.py: rope_inv_freq``).
    """

    rope_type: str
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if self.rope_type != "llama3":
            raise ConfigError(f"rope_scaling: rope type {show(self.rope_type)} is not implemented (supported: llama3)")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            object.__setattr__(self, name, field_float(getattr(self, name), f"rope_scaling.{name}", 0.0, 1e6))
        field_int(self.original_max_position_embeddings, "rope_scaling.original_max_position_embeddings", 1,
                   MAX_POSITIONS)
        if not self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(f"rope_scaling: low_freq_factor ({self.low_freq_factor:g}) must be less than "
                              f"high_freq_factor ({self.high_freq_factor:g})")


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """Architecture of a decoder-only target (pre-norm, grouped-query attention,
    RoPE, SwiGLU MLP, RMSNorm), as in HF ``config.json``.

    The architectures differ in flags: Qwen3 has a per-head RMSNorm on q and k
    (``qk_norm``); Qwen2 has biases on q/k/v (``qkv_bias``); Llama has
    ``attention_bias`` on q/k/v/o (usually off) and ``llama3`` RoPE scaling.
    Subclasses name the ``model_type`` values they accept (``MODEL_TYPES``).
    """

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()

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
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        _check_shapes(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                             "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"))
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm"):
            field_bool(getattr(self, name), name)
        if not isinstance(self.model_type, str) or self.model_type not in self.MODEL_TYPES:
            raise ConfigError(f"unknown model_type {show(self.model_type)} for {type(self).__name__}; "
                              f"supported: {', '.join(self.MODEL_TYPES)}")
        if not isinstance(self.eos_token_ids, (tuple, list)):
            field_fail(None, "eos_token_ids", f"a tuple of ints from 0 to {MAX_TOKEN_ID}", self.eos_token_ids)
        eos = field_ids(self.eos_token_ids, "eos_token_ids", scalar=False, hi=MAX_TOKEN_ID)
        object.__setattr__(self, "eos_token_ids", eos)
        outside = [t for t in self.eos_token_ids if t >= self.vocab_size]
        if outside:  # generation would never stop on them
            raise ConfigError(f"eos_token_id {outside[0]} is outside the vocabulary [0, {self.vocab_size}) "
                              f"(vocab_size {self.vocab_size}; eos ids from config.json or generation_config.json)")
        _check_optional_id(self.bos_token_id, "bos_token_id")
        _check_optional_id(self.pad_token_id, "pad_token_id")
        _check_rope_scaling(self.rope_scaling)

    @property
    def default_feature_layers(self) -> tuple[int, int, int]:
        """EAGLE-3 feature layers: inputs of layers [2, L//2, L-3] (HF hidden_states indices)."""
        n = self.num_hidden_layers
        return (2, n // 2, n - 3)



@dataclasses.dataclass(frozen=True)
class Qwen3Config(TargetConfig):
    """A Qwen3 (``qwen3``) or Qwen2 / Qwen2.5 (``qwen2``) target.

    Qwen2 is the same network with biases on q/k/v and without the per-head
    q/k RMSNorm, expressed by ``qkv_bias=True, qk_norm=False``.
    """

    MODEL_TYPES: ClassVar[tuple[str, ...]] = SUPPORTED_MODEL_TYPES

    # ------------------------------------------------------- known checkpoints

    @classmethod
    def qwen3_4b_thinking_2507(cls) -> Qwen3Config:
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


@dataclasses.dataclass(frozen=True)
class LlamaConfig(TargetConfig):
    """A Llama target (``llama``: Llama 2, 3, 3.1, 3.2, 3.3): no q/k norm,
    ``attention_bias`` on q/k/v/o, ``llama3`` RoPE scaling for 3.1 and later."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("llama",)

    qk_norm: bool = False
    model_type: str = "llama"

    def __post_init__(self):
        super().__post_init__()
        if self.qk_norm:
            raise ConfigError("qk_norm must be false for a llama target (Llama has no q/k norm)")
        if self.o_bias != self.qkv_bias:
            raise ConfigError(f"qkv_bias ({self.qkv_bias}) and o_bias ({self.o_bias}) must agree for a llama target "
                              "(attention_bias puts biases on q, k, v and o)")

    @classmethod
    def llama_3_1_8b_instruct(cls) -> LlamaConfig:
        """meta-llama/Llama-3.1-8B-Instruct (the target of the first published EAGLE-3 heads)."""
        return cls(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rope_theta=500_000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=131072,
            tie_word_embeddings=False,
            eos_token_ids=(128001, 128008, 128009),
            bos_token_id=128000,
            rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192),
        )


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """An EAGLE-3 draft head, whatever format it was published in (SpecForge /
    SGLang ``LlamaForCausalLMEagle3``, the EAGLE authors' checkpoints, or
    ``speculators`` ``Eagle3Speculator``; ``eagle3_jax/hf_heads.py: parse_eagle3``).

    One Llama decoder layer whose attention reads ``[input_layernorm(emb),
    hidden_norm(h)]`` (2H wide), ``fc`` from the target's three concatenated
    feature layers to H, and ``lm_head`` over a reduced draft vocabulary
    mapped to target ids by ``d2t``.

    Attributes:
      aux_layer_ids: SpecForge's ``eagle_config.eagle_aux_hidden_state_layer_ids``
        (None: the target's default layers): the features are taken at the
        *inputs* of layers ``id + 1``. Other formats' ids are translated to
        this meaning when parsed (docs/architecture.md#head-formats).
      rope_theta: the draft's RoPE base. Some published heads were trained
        with 10000 whatever their config says; override it when loading
        (``rope_theta=`` / ``--draft-rope-theta``) if acceptance is poor.
      rope_scaling: the head's RoPE scaling (``llama3`` for heads of Llama
        3.1 targets), or None.
      norm_before_residual: the residual around the head's attention is
        ``hidden_norm(h)`` instead of ``h`` (``speculators``' flag; False for
        SpecForge and the EAGLE authors' heads).
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
    rope_scaling: RopeScaling | None = None
    norm_before_residual: bool = False

    def __post_init__(self):
        _check_shapes(self, ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                             "head_dim", "vocab_size", "draft_vocab_size", "target_hidden_size",
                             "max_position_embeddings"))
        _check_rope_scaling(self.rope_scaling)
        field_bool(self.norm_before_residual, "norm_before_residual")
        if self.draft_vocab_size > self.vocab_size:
            raise ConfigError(f"draft_vocab_size ({self.draft_vocab_size}) exceeds vocab_size ({self.vocab_size})")
        if self.aux_layer_ids is not None:
            if not isinstance(self.aux_layer_ids, (tuple, list)):
                field_fail(None, "aux_layer_ids", "a tuple of ints or None", self.aux_layer_ids)
            object.__setattr__(self, "aux_layer_ids", field_ids(self.aux_layer_ids, "aux_layer_ids", scalar=False,
                                                                 lo=MIN_AUX_LAYER_ID, hi=MAX_LAYERS - 2))
        _check_optional_id(self.bos_token_id, "bos_token_id")
        _check_optional_id(self.eos_token_id, "eos_token_id")

    def feature_layers(self, target: TargetConfig) -> tuple[int, ...]:
        """The target layers whose inputs feed ``fc`` (HF hidden_states indices)."""
        if self.aux_layer_ids is None:
            return target.default_feature_layers
        return tuple(i + 1 for i in self.aux_layer_ids)

    def with_overrides(self, *, rope_theta: float | None = None,
                       feature_layers: tuple[int, ...] | None = None) -> Eagle3Config:
        """A copy with the known pitfalls of published heads corrected.

        ``rope_theta`` makes the head's RoPE plain with that base (any
        ``rope_scaling`` of its config is dropped): heads trained by SpecForge
        before November 2025 used plain RoPE with base 10000 whatever their
        config said. ``feature_layers`` are HF hidden_states indices (inputs of
        layers), so ``(2, 18, 33)`` is the default for a 36-layer target.

        Raises:
          ConfigError: ``rope_theta`` is not a finite number in
            (MIN_ROPE_THETA, MAX_ROPE_THETA], or ``feature_layers`` are not
            integers from 0 to MAX_LAYERS - 1.
        """
        cfg = self
        if rope_theta is not None:
            theta = field_float(rope_theta, "rope_theta (override)", MIN_ROPE_THETA, MAX_ROPE_THETA)
            cfg = dataclasses.replace(cfg, rope_theta=theta, rope_scaling=None)
        if feature_layers is not None:
            layers = _check_feature_layers(feature_layers, "feature_layers (override)")
            cfg = dataclasses.replace(cfg, aux_layer_ids=tuple(i - 1 for i in layers))
        return cfg

    def check_target(self, target: TargetConfig, *, where: str = "draft") -> None:
        """Raises ConfigError unless this head can run on ``target``."""
        if not isinstance(target, TargetConfig):
            raise ConfigError(f"{where}: the target config must be a TargetConfig, got {type(target).__name__}")
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
            problems.append(f"EAGLE-3 needs 3 feature layers, got {show(list(layers))}")
        bad = [i for i in layers if not 0 <= i < target.num_hidden_layers]
        if bad:
            problems.append(f"feature layers {show(bad)} are outside the target's {target.num_hidden_layers} layers "
                            f"(valid: 0..{target.num_hidden_layers - 1})")
        if problems:
            raise ConfigError(f"{where} does not match the target: " + "; ".join(problems))

    @classmethod
    def for_target(cls, target: TargetConfig, *, draft_vocab_size: int = 32000,
                   feature_layers: tuple[int, ...] | None = None) -> Eagle3Config:
        """A new head shaped like SpecForge's default for ``target`` (for training)."""
        if feature_layers is not None:
            feature_layers = _check_feature_layers(feature_layers, "feature_layers")
        layers = feature_layers or target.default_feature_layers
        bad = [i for i in layers if not 0 <= i < target.num_hidden_layers]
        if bad:
            raise ConfigError(f"feature layers {show(bad)} are outside the target's {target.num_hidden_layers} "
                              f"layers (valid: 0..{target.num_hidden_layers - 1})")
        draft_vocab_size = field_int(draft_vocab_size, "draft_vocab_size", 1, MAX_VOCAB_SIZE)
        return cls(hidden_size=target.hidden_size, intermediate_size=target.intermediate_size,
                   num_attention_heads=target.num_attention_heads, num_key_value_heads=target.num_key_value_heads,
                   head_dim=target.head_dim, vocab_size=target.vocab_size,
                   draft_vocab_size=min(draft_vocab_size, target.vocab_size), target_hidden_size=target.hidden_size,
                   rope_theta=target.rope_theta, rope_scaling=target.rope_scaling, rms_norm_eps=target.rms_norm_eps,
                   max_position_embeddings=target.max_position_embeddings,
                   aux_layer_ids=tuple(i - 1 for i in layers), bos_token_id=target.bos_token_id,
                   eos_token_id=target.eos_token_ids[0] if target.eos_token_ids else None)
