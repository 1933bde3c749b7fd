"""Model configs: frozen, hashable dataclasses parsed from Hugging Face config.json.

A config is a static argument of every jitted function, so it must be hashable
and immutable; every field that changes a compiled shape lives here.

A config.json is untrusted input. Every key is read by one of the small typed
readers below (``_int``, ``_float``, ``_bool``, ``_ids``, ``_mapping``), shared
by both parsers, so that a value of the wrong type or out of range is a
:class:`ConfigError` naming the file and the key, never a ``TypeError`` deep
in model building. The rules:

* ``null`` is the same as an absent key: a required key is then missing, an
  optional one takes its default (as ``transformers`` treats it).
* Integers must be JSON integers: ``true`` (a bool is an int in Python), ``256.0``
  and ``"256"`` are refused, not coerced.
* Floats must be finite (Python's ``json`` accepts ``NaN`` and ``Infinity``).
* Booleans must be ``true`` or ``false`` (``"no"`` is not false).
* Unknown keys are ignored: HF configs carry many that do not matter here.

The dataclass constructors check the same types and ranges again, so a config
built from Python is held to the same rules (with the field names in the message).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import operator
import os
import reprlib
import stat
from typing import Any, Iterable, Mapping, NoReturn

from eagle3_jax.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2")

# RoPE variants implemented by ``eagle3_jax.models.layers.rope_inv_freq``.
SUPPORTED_ROPE_TYPES = ("default",)

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
_SIZE_LIMITS = {
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

# ------------------------------------------------------ value checks and readers

_REQUIRED = object()  # the ``default`` of a reader whose key must be present

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 6
_repr.maxlevel = 3


def _show(value: Any) -> str:
    """A short repr for an error message, safe for huge or deeply nested values."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    try:
        return _repr.repr(value)
    except Exception:  # a pathological object (a repr that fails or recurses too deep)
        return f"<{type(value).__name__}>"


def _describe(value: Any) -> str:
    """``value`` for an error message, with its JSON type where the repr could mislead."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (str, "a string"), (float, "a float"), ((list, tuple), "a list"),
             (Mapping, "an object"))
    kind = next((k for t, k in kinds if isinstance(value, t)), None)
    return f"{_show(value)} ({kind})" if kind else _show(value)


def _prefix(where: str | None) -> str:
    return f"{where}: " if where else ""


def _fail(where: str | None, key: str, expected: str, value: Any) -> NoReturn:
    raise ConfigError(f"{_prefix(where)}{key} must be {expected}, got {_describe(value)}")


def _int_range(lo: int, hi: int) -> str:
    if lo == 1:
        return f"a positive integer (at most {hi})"
    if lo == 0:
        return f"a non-negative integer (at most {hi})"
    return f"an integer from {lo} to {hi}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(value: Any, key: str, lo: int, hi: int, where: str | None = None) -> int:
    """``value`` if it is an int (not a bool, not a float) in ``[lo, hi]``."""
    if not _is_int(value) or not lo <= value <= hi:
        _fail(where, key, _int_range(lo, hi), value)
    return int(value)


def _check_float(value: Any, key: str, lo: float, hi: float, *, lo_open: bool = True, hi_open: bool = False,
                 where: str | None = None) -> float:
    """``value`` as a float if it is a finite real number (not a bool) in the given range."""
    lo_text = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
    hi_text = f"less than {hi:g}" if hi_open else f"at most {hi:g}"
    expected = f"a finite number {lo_text} and {hi_text}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(where, key, expected, value)
    try:
        x = float(value)
    except (OverflowError, ValueError, TypeError):
        _fail(where, key, expected, value)
    if not math.isfinite(x) or (x <= lo if lo_open else x < lo) or (x >= hi if hi_open else x > hi):
        _fail(where, key, expected, value)
    return x


def _check_bool(value: Any, key: str, where: str | None = None) -> bool:
    if not isinstance(value, bool):
        _fail(where, key, "true or false", value)
    return value


def _check_ids(value: Any, key: str, where: str | None = None, *, lo: int = 0, hi: int = MAX_TOKEN_ID,
               scalar: bool = True) -> tuple[int, ...]:
    """A tuple of ints in ``[lo, hi]`` from a list (or, if ``scalar``, a single int); null is ()."""
    if value is None:
        return ()
    if scalar and _is_int(value) and lo <= value <= hi:
        return (int(value),)
    if isinstance(value, (list, tuple)) and all(_is_int(v) and lo <= v <= hi for v in value):
        return tuple(int(v) for v in value)
    what = "an int or a list of ints" if scalar else "a list of ints"
    _fail(where, key, f"{what} from {lo} to {hi}", value)


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
        raise ConfigError(f"{where}: eos_token_id {outside[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


def _check_feature_layers(layers: Any, key: str) -> tuple[int, ...]:
    """HF hidden_states indices (inputs of layers): ints (or numpy ints) from 0 to MAX_LAYERS - 1."""
    expected = f"a list of layer indices (integers from 0 to {MAX_LAYERS - 1})"
    if isinstance(layers, (str, bytes, Mapping)):
        _fail(None, key, expected, layers)
    try:
        items = list(layers)
    except TypeError:
        _fail(None, key, expected, layers)
    out = []
    for i in items:
        try:
            index = None if isinstance(i, bool) else operator.index(i)
        except TypeError:
            index = None
        if index is None or not 0 <= index < MAX_LAYERS:
            _fail(None, key, expected, items)
        out.append(index)
    return tuple(out)


def _check_act(raw: Mapping[str, Any], where: str) -> None:
    act = raw.get("hidden_act")
    if act is not None and act != "silu":
        raise ConfigError(f"{where}: hidden_act {_show(act)} is not supported (only 'silu')")


def _rope_settings(raw: Mapping[str, Any], where: str) -> float:
    """Returns rope_theta from either the transformers-4 or -5 spelling.

    transformers 4 writes ``rope_theta`` (and ``rope_scaling``) at the top level;
    transformers 5 writes ``rope_parameters: {rope_theta, rope_type}``.
    """
    params = _mapping(raw, "rope_parameters", where)
    key, theta = "rope_theta", raw.get("rope_theta")
    if theta is None and params is not None:
        key, theta = "rope_parameters.rope_theta", params.get("rope_theta")
    if theta is None:
        raise ConfigError(f"{where}: missing rope_theta (neither 'rope_theta' nor 'rope_parameters.rope_theta' is set)")
    theta = _check_float(theta, key, MIN_ROPE_THETA, MAX_ROPE_THETA, where=where)
    for key in ("rope_scaling", "rope_parameters"):
        scaling = _mapping(raw, key, where)
        if not scaling:
            continue
        rope_type = scaling.get("rope_type")
        if rope_type is None:
            rope_type = scaling.get("type")
        if rope_type is None:
            rope_type = "default"
        if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{where}: {key} asks for rope type {_show(rope_type)}, which is not implemented "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)}). Remove the scaling from config.json "
                "to run at the model's native context length."
            )
    return theta


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


def _check_shapes(cfg, size_fields: tuple[str, ...]) -> None:
    """The checks every attention config shares: sizes in range, grouped heads, an even head_dim, a RoPE base.

    Also normalises ``rope_theta`` and ``rms_norm_eps`` to float (an int is accepted).
    """
    for name in size_fields:
        _check_int(getattr(cfg, name), name, 1, _SIZE_LIMITS[name])
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
                          f"num_key_value_heads ({cfg.num_key_value_heads})")
    if cfg.head_dim % 2:
        raise ConfigError(f"head_dim must be even for RoPE, got {cfg.head_dim}")
    object.__setattr__(cfg, "rope_theta", _check_float(cfg.rope_theta, "rope_theta", MIN_ROPE_THETA, MAX_ROPE_THETA))
    object.__setattr__(cfg, "rms_norm_eps",
                       _check_float(cfg.rms_norm_eps, "rms_norm_eps", 0.0, MAX_RMS_NORM_EPS, hi_open=True))


def _check_optional_id(value: Any, name: str) -> None:
    if value is not None:
        _check_int(value, name, 0, MAX_TOKEN_ID)


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
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm"):
            _check_bool(getattr(self, name), name)
        if not isinstance(self.model_type, str) or self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unknown model_type {_show(self.model_type)}; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if not isinstance(self.eos_token_ids, (tuple, list)):
            _fail(None, "eos_token_ids", f"a tuple of ints from 0 to {MAX_TOKEN_ID}", self.eos_token_ids)
        object.__setattr__(self, "eos_token_ids", _check_ids(self.eos_token_ids, "eos_token_ids", scalar=False))
        outside = [t for t in self.eos_token_ids if t >= self.vocab_size]
        if outside:  # generation would never stop on them
            raise ConfigError(f"eos_token_id {outside[0]} is outside the vocabulary [0, {self.vocab_size}) "
                              "(config.json or generation_config.json)")
        _check_optional_id(self.bos_token_id, "bos_token_id")
        _check_optional_id(self.pad_token_id, "pad_token_id")

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
                     generation_config: Mapping[str, Any] | None = None, *,
                     generation_where: str = "generation_config.json") -> "Qwen3Config":
        """Parses an HF ``config.json`` dict of a ``qwen3`` or ``qwen2`` model.

        ``generation_config`` (the model's generation_config.json, if any) adds
        its ``eos_token_id`` entries to the stop ids. ``where`` and
        ``generation_where`` name the two files in error messages.

        Raises:
          ConfigError: a key is missing, of the wrong type, out of range (see
            the ``MAX_*`` limits of this module) or asks for something unsupported.
        """
        _check_object(raw, where)
        model_type = raw.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: unknown model_type {_show(model_type)}; eagle3-jax supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} targets"
            )
        _require(raw, where, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads"))
        _check_act(raw, where)
        if _bool(raw, "use_sliding_window", where):
            raise ConfigError(f"{where}: use_sliding_window=true is not supported (sliding-window attention)")
        layer_types = raw.get("layer_types")
        if layer_types is not None:
            if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
                _fail(where, "layer_types", "a list of strings", layer_types)
            if any(t != "full_attention" for t in layer_types):
                raise ConfigError(f"{where}: only full_attention layers are supported, "
                                  f"got layer_types={_show(sorted(set(layer_types)))}")

        hidden, heads, head_dim = _attention_sizes(raw, where)
        vocab_size = _int(raw, "vocab_size", where)
        eos = _eos_in_vocabulary(_ids(raw, "eos_token_id", where), vocab_size, where)
        if generation_config is not None:
            _check_object(generation_config, generation_where)
            extra = _ids(generation_config, "eos_token_id", generation_where)
            for t in _eos_in_vocabulary(extra, vocab_size, generation_where):
                if t not in eos:
                    eos = eos + (t,)
        if model_type == "qwen3":
            bias = _bool(raw, "attention_bias", where)
            qkv_bias, o_bias, qk_norm = bias, bias, True
        else:  # qwen2: q/k/v biases, no o bias, no q/k norm
            qkv_bias, o_bias, qk_norm = True, False, False
        try:
            return cls(
                model_type=model_type,
                vocab_size=vocab_size,
                hidden_size=hidden,
                intermediate_size=_int(raw, "intermediate_size", where),
                num_hidden_layers=_int(raw, "num_hidden_layers", where),
                num_attention_heads=heads,
                num_key_value_heads=_int(raw, "num_key_value_heads", where, default=heads),
                head_dim=head_dim,
                rope_theta=_rope_settings(raw, where),
                rms_norm_eps=_float(raw, "rms_norm_eps", where, 0.0, MAX_RMS_NORM_EPS, hi_open=True, default=1e-6),
                max_position_embeddings=_int(raw, "max_position_embeddings", where, default=32768),
                tie_word_embeddings=_bool(raw, "tie_word_embeddings", where),
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                qk_norm=qk_norm,
                eos_token_ids=eos,
                bos_token_id=_id(raw, "bos_token_id", where),
                pad_token_id=_id(raw, "pad_token_id", where),
            )
        except ConfigError as e:
            if str(e).startswith(f"{where}: "):
                raise
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "Qwen3Config":
        """Reads ``config.json`` (and ``generation_config.json`` if present) from a model directory."""
        model_dir = os.fspath(model_dir)
        path = os.path.join(model_dir, "config.json")
        gen_path = os.path.join(model_dir, "generation_config.json")
        gen = read_json(gen_path) if os.path.exists(gen_path) else None
        return cls.from_hf_dict(read_json(path), where=path, generation_config=gen, generation_where=gen_path)

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
        if self.aux_layer_ids is not None:
            if not isinstance(self.aux_layer_ids, (tuple, list)):
                _fail(None, "aux_layer_ids", "a tuple of ints or None", self.aux_layer_ids)
            object.__setattr__(self, "aux_layer_ids", _check_ids(self.aux_layer_ids, "aux_layer_ids", scalar=False,
                                                                 lo=MIN_AUX_LAYER_ID, hi=MAX_LAYERS - 2))
        _check_optional_id(self.bos_token_id, "bos_token_id")
        _check_optional_id(self.eos_token_id, "eos_token_id")

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

        Raises:
          ConfigError: ``rope_theta`` is not a finite number in
            (MIN_ROPE_THETA, MAX_ROPE_THETA], or ``feature_layers`` are not
            integers from 0 to MAX_LAYERS - 1.
        """
        cfg = self
        if rope_theta is not None:
            theta = _check_float(rope_theta, "rope_theta (override)", MIN_ROPE_THETA, MAX_ROPE_THETA)
            cfg = dataclasses.replace(cfg, rope_theta=theta)
        if feature_layers is not None:
            layers = _check_feature_layers(feature_layers, "feature_layers (override)")
            cfg = dataclasses.replace(cfg, aux_layer_ids=tuple(i - 1 for i in layers))
        return cfg

    def check_target(self, target: Qwen3Config, *, where: str = "draft") -> None:
        """Raises ConfigError unless this head can run on ``target``."""
        if not isinstance(target, Qwen3Config):
            raise ConfigError(f"{where}: the target config must be a Qwen3Config, got {type(target).__name__}")
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
            problems.append(f"EAGLE-3 needs 3 feature layers, got {_show(list(layers))}")
        bad = [i for i in layers if not 0 <= i < target.num_hidden_layers]
        if bad:
            problems.append(f"feature layers {_show(bad)} are outside the target's {target.num_hidden_layers} layers "
                            f"(valid: 0..{target.num_hidden_layers - 1})")
        if problems:
            raise ConfigError(f"{where} does not match the target: " + "; ".join(problems))

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], where: str = "config.json") -> "Eagle3Config":
        """Parses a SpecForge / SGLang EAGLE-3 head ``config.json`` dict.

        Raises:
          ConfigError: as :meth:`Qwen3Config.from_hf_dict`, or the head is not a
            single-layer EAGLE-3 Llama head without biases.
        """
        _check_object(raw, where)
        archs = raw.get("architectures")
        if not isinstance(archs, list) or not any(isinstance(a, str) and a in EAGLE3_ARCHITECTURES for a in archs):
            raise ConfigError(f"{where}: not an EAGLE-3 draft head (architectures={_show(archs)}; "
                              f"expected one of {', '.join(EAGLE3_ARCHITECTURES)})")
        _require(raw, where, ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"))
        layers = _int(raw, "num_hidden_layers", where, default=1)
        if layers != 1:
            raise ConfigError(f"{where}: only single-layer EAGLE-3 heads are supported (num_hidden_layers={layers})")
        _check_act(raw, where)
        for flag in ("fc_norm", "attention_bias", "bias", "mlp_bias", "tie_word_embeddings"):
            if _bool(raw, flag, where):
                raise ConfigError(f"{where}: {flag}=true is not supported for EAGLE-3 heads")
        eagle = _mapping(raw, "eagle_config", where) or {}
        ids = eagle.get("eagle_aux_hidden_state_layer_ids")
        if ids is not None:
            ids = _ids(eagle, "eagle_aux_hidden_state_layer_ids", where,
                       name="eagle_config.eagle_aux_hidden_state_layer_ids", lo=MIN_AUX_LAYER_ID, hi=MAX_LAYERS - 2)
        hidden, heads, head_dim = _attention_sizes(raw, where)
        vocab = _int(raw, "vocab_size", where)
        eos = _ids(raw, "eos_token_id", where)
        try:
            return cls(
                hidden_size=hidden,
                intermediate_size=_int(raw, "intermediate_size", where),
                num_attention_heads=heads,
                num_key_value_heads=_int(raw, "num_key_value_heads", where, default=heads),
                head_dim=head_dim,
                vocab_size=vocab,
                draft_vocab_size=_int(raw, "draft_vocab_size", where, default=vocab),
                target_hidden_size=_int(raw, "target_hidden_size", where, default=hidden),
                rope_theta=_rope_settings(raw, where),
                rms_norm_eps=_float(raw, "rms_norm_eps", where, 0.0, MAX_RMS_NORM_EPS, hi_open=True, default=1e-6),
                max_position_embeddings=_int(raw, "max_position_embeddings", where, default=32768),
                aux_layer_ids=ids,
                bos_token_id=_id(raw, "bos_token_id", where),
                eos_token_id=eos[0] if eos else None,
            )
        except ConfigError as e:
            if str(e).startswith(f"{where}: "):
                raise
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "Eagle3Config":
        """Reads a draft head's ``config.json`` from its directory."""
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
        if feature_layers is not None:
            feature_layers = _check_feature_layers(feature_layers, "feature_layers")
        layers = feature_layers or target.default_feature_layers
        bad = [i for i in layers if not 0 <= i < target.num_hidden_layers]
        if bad:
            raise ConfigError(f"feature layers {_show(bad)} are outside the target's {target.num_hidden_layers} "
                              f"layers (valid: 0..{target.num_hidden_layers - 1})")
        draft_vocab_size = _check_int(draft_vocab_size, "draft_vocab_size", 1, MAX_VOCAB_SIZE)
        return cls(hidden_size=target.hidden_size, intermediate_size=target.intermediate_size,
                   num_attention_heads=target.num_attention_heads, num_key_value_heads=target.num_key_value_heads,
                   head_dim=target.head_dim, vocab_size=target.vocab_size,
                   draft_vocab_size=min(draft_vocab_size, target.vocab_size), target_hidden_size=target.hidden_size,
                   rope_theta=target.rope_theta, rms_norm_eps=target.rms_norm_eps,
                   max_position_embeddings=target.max_position_embeddings,
                   aux_layer_ids=tuple(i - 1 for i in layers), bos_token_id=target.bos_token_id,
                   eos_token_id=target.eos_token_ids[0] if target.eos_token_ids else None)
