"""Loading targets and draft heads from HF checkpoints or converted directories, converting and exporting them.

Targets of every registered architecture (``eagle3_jax/models/registry.py``:
Qwen3, Qwen2, Llama) load through the same path: the registry gives the config
parser, the module and the weight-name rules for the config's ``model_type``.
Draft heads load in each format they are published in
(``eagle3_jax/hf_heads.py: parse_eagle3``, ``eagle3_jax/weights/rules.py: eagle3_rules``).
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from eagle3_jax.atomic import atomic_directory, check_destination
from eagle3_jax.config import Eagle3Config, TargetConfig
from eagle3_jax.errors import CheckpointError, ConfigError
from eagle3_jax.hf_config import target_to_hf
from eagle3_jax.hf_heads import eagle3_to_hf, head_format, parse_eagle3
from eagle3_jax.hf_json import read_json
from eagle3_jax.hub import resolve_model_dir
from eagle3_jax.models.eagle3 import Eagle3DraftHead
from eagle3_jax.models.registry import abstract_target, read_target_config, target_rules
from eagle3_jax.models.target import TargetModel
from eagle3_jax.sharding import ShardingPlan, check_mesh, put
from eagle3_jax.weights import converted, torch_bin
from eagle3_jax.weights.params import export_safetensors, load_safetensors_into
from eagle3_jax.weights.rules import eagle3_rules
from eagle3_jax.weights.safetensors_io import SafetensorsFile, checkpoint_files, directory_metadata

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The marker of an HF-format export of eagle3-jax (save_target, save_draft): a key of the
# safetensors metadata, so the directory stays exactly what SpecForge, SGLang and vLLM load.
EXPORT_MARKER_KEY = "eagle3_jax_export"


def is_export(path: str, kind: str) -> bool:
    """True if ``path`` is a directory that :func:`save_target` (kind 'target') or :func:`save_draft`
    ('draft') wrote."""
    return (directory_metadata(path) or {}).get(EXPORT_MARKER_KEY) == kind


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


# The directory each loaded target came from, so that a Generator can find its tokenizer
# (a registry rather than an attribute: an attribute would become part of the module's
# graph definition, and two targets loaded from different directories would compile apart).
_TARGET_DIRS: weakref.WeakKeyDictionary[TargetModel, str] = weakref.WeakKeyDictionary()


def target_directory(model: TargetModel) -> str | None:
    """The local directory :func:`load_target` read ``model`` from (a Hub id resolved to its
    snapshot), or None for a model built otherwise. Its tokenizer is the target's own."""
    try:
        return _TARGET_DIRS.get(model)
    except TypeError:  # not weakly referenceable: not one of ours
        return None


def load_target(name_or_path: str | os.PathLike, *, dtype=None, progress: bool = True,
                check_finite: bool = True, mesh=None) -> TargetModel:
    """Loads a target: Qwen3, Qwen2 or Llama (any ``model_type`` of the registry).

    Args:
      name_or_path: a local HF directory (config.json + model.safetensors or a
        sharded index), a directory written by :func:`convert_target`, a
        llama.cpp GGUF file (llama, qwen2, qwen3; dequantized once into the
        user's cache, ``eagle3_jax/weights/gguf_cache.py``), or a Hub id
        fetched with ``huggingface_hub``.
      dtype: parameter and activation dtype ('float32', 'bfloat16', a jnp
        dtype, or None for bfloat16 on accelerators and float32 on CPU).
      progress: show a progress bar while tensors load.
      check_finite: refuse (CheckpointError) weights that hold NaN or Inf,
        naming the tensor. The check reads each tensor once as it loads
        (about 0.1-0.3 s per GB on a CPU) and also catches values that
        overflow the requested dtype; generation separately stops a row on
        non-finite logits (finish_reason 'nonfinite').
      mesh: a ``(data, tensor)`` device mesh (:func:`eagle3_jax.sharding.make_mesh`):
        each tensor is placed straight onto its shards as it is read
        (by the logical axes the model's modules declare; a converted checkpoint
        is restored into them), never whole on one device. None: the default device.

    The model remembers its directory (:func:`target_directory`): a
    :class:`~eagle3_jax.generation.Generator` takes the tokenizer there for
    text prompts and text outputs.
    """
    model_dir = resolve_model_dir(name_or_path)
    dtype = parse_dtype(dtype)
    cfg = read_target_config(model_dir)
    abstract = abstract_target(cfg, dtype)
    place = sharding_of = None
    if mesh is not None:
        shardings = ShardingPlan.for_target(mesh, cfg).param_shardings(abstract)

        def sharding_of(path: str, shape: tuple[int, ...]):
            return shardings[path]

        def place(path: str, array: np.ndarray) -> jax.Array:
            return put(array, sharding_of(path, array.shape))

    if converted.is_converted(model_dir):
        converted.read_marker(model_dir)
        model = converted.restore_into(abstract, model_dir, check_finite=check_finite, sharding_of=sharding_of)
    else:
        model = load_safetensors_into(abstract, checkpoint_files(model_dir), target_rules(cfg), source=model_dir,
                                      progress=progress, check_finite=check_finite, place=place)
    _TARGET_DIRS[model] = os.path.abspath(model_dir)
    return model


def checkpoint_dtype(model_dir: str) -> jnp.dtype:
    """The dtype a checkpoint stores its weights in: config.json's ``torch_dtype`` (or ``dtype``) when it names a
    float type, else the dtype of its embedding tensor, else bfloat16."""
    raw = read_json(os.path.join(model_dir, "config.json"))
    for key in ("torch_dtype", "dtype"):
        if isinstance(raw.get(key), str) and raw[key] in DTYPES:
            return jnp.dtype(DTYPES[raw[key]])
    try:
        for path in checkpoint_files(model_dir):
            f = SafetensorsFile(path)
            for name in f.keys():
                if name.endswith("embed_tokens.weight"):
                    dtype = jnp.dtype(f.dtype(name))
                    return dtype if dtype.name in DTYPES else jnp.dtype(jnp.bfloat16)
    except CheckpointError:  # no readable safetensors (e.g. a head as pytorch_model.bin): the default
        pass
    return jnp.dtype(jnp.bfloat16)


def convert_target(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, overwrite: bool = False,
                   progress: bool = True) -> str:
    """Converts an HF target checkpoint (or a GGUF file) into the faster-loading orbax format at ``dst``.

    ``dtype`` defaults to the checkpoint's own (:func:`checkpoint_dtype`:
    a float32 checkpoint stays float32); loading casts to whatever dtype is
    asked for then. The marker ``eagle3_jax.json`` records the dtype stored.
    """
    check_destination(dst, overwrite=overwrite, replaceable=converted.is_converted, what="converted checkpoint")
    model_dir = resolve_model_dir(src)
    dtype = parse_dtype(dtype) if dtype not in (None, "keep") else checkpoint_dtype(model_dir)
    model = load_target(model_dir, dtype=dtype, progress=progress)
    return converted.save_converted(model, model_dir, os.fspath(dst), kind="target", overwrite=overwrite,
                                    extra={"source": os.fspath(src), "dtype": dtype.name})


def save_target(model: TargetModel, output_dir: str | os.PathLike, *, dtype="bfloat16",
                tokenizer_dir: str | None = None, overwrite: bool = False) -> str:
    """Writes a target as an HF checkpoint (config.json, generation_config.json,
    model.safetensors, and the tokenizer files of ``tokenizer_dir``) that
    ``transformers`` and :func:`load_target` both load. The directory appears atomically."""
    import shutil

    cfg = model.config
    out = os.path.abspath(os.fspath(output_dir))
    with atomic_directory(out, overwrite=overwrite, replaceable=lambda p: is_export(p, "target"),
                          what="exported target") as tmp:
        config = target_to_hf(cfg)
        config["torch_dtype"] = parse_dtype(dtype).name
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        generation = {"eos_token_id": list(cfg.eos_token_ids)}
        if cfg.bos_token_id is not None:
            generation["bos_token_id"] = cfg.bos_token_id
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation, f, indent=2)
        export_safetensors(model, target_rules(cfg), os.path.join(tmp, "model.safetensors"),
                           dtype=parse_dtype(dtype), metadata={"format": "pt", EXPORT_MARKER_KEY: "target"})
        if tokenizer_dir:
            for name in os.listdir(tokenizer_dir):
                if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or name.endswith(".jinja"):
                    shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
    return out


# ------------------------------------------------------------------- drafts

def abstract_draft(cfg: Eagle3Config, dtype, own_embedding: bool = False) -> Eagle3DraftHead:
    return nnx.eval_shape(lambda: Eagle3DraftHead(cfg, dtype=dtype, rngs=nnx.Rngs(0), own_embedding=own_embedding))


def check_vocab_map(d2t: np.ndarray, t2d: np.ndarray, *, source: str) -> None:
    """Raises CheckpointError unless d2t/t2d describe one consistent draft vocabulary."""
    draft_vocab, vocab = d2t.shape[0], t2d.shape[0]
    ids = np.arange(draft_vocab) + d2t.astype(np.int64)
    bad = np.flatnonzero((ids < 0) | (ids >= vocab))
    if bad.size:
        raise CheckpointError(f"{source}: d2t maps draft id {int(bad[0])} to target id {int(ids[bad[0]])}, "
                              f"outside the vocabulary [0, {vocab})")
    if np.unique(ids).size != draft_vocab:
        raise CheckpointError(f"{source}: d2t maps several draft ids to the same target id")
    if not t2d[ids].all() or int(t2d.sum()) != draft_vocab:
        raise CheckpointError(f"{source}: t2d ({int(t2d.sum())} target ids marked) does not match d2t "
                              f"({draft_vocab} draft ids)")


def load_draft(name_or_path: str | os.PathLike, target_config: TargetConfig | None = None, *, dtype=None,
               rope_theta: float | None = None, feature_layers: tuple[int, ...] | None = None,
               keep_embedding: bool = False, progress: bool = True, check_finite: bool = True,
               mesh=None) -> Eagle3DraftHead:
    """Loads an EAGLE-3 draft head in any of the formats heads are published in.

    The format is read from config.json (``eagle3_jax.hf_config.head_format``):
    SpecForge / SGLang ``LlamaForCausalLMEagle3`` (model.safetensors), the
    EAGLE authors' checkpoints (``yuhuili/EAGLE3-*``: a LlamaForCausalLM config
    with draft_vocab_size, weights in pytorch_model.bin, read with PyTorch's
    restricted unpickler), or ``speculators`` ``Eagle3Speculator``
    (``transformer_layer_config``, ``norm_before_residual``, ``layers.0.*``).

    Args:
      name_or_path: a local directory (config.json + weights), a
        directory written by :func:`convert_draft`, or a Hub id.
      target_config: when given, the head is checked against the target
        (hidden sizes, vocabulary, feature layers) and a mismatch is an error.
      dtype: as for :func:`load_target`.
      rope_theta: override the draft's RoPE base (some published heads were
        trained with 10000 whatever their config says). Default: config.json.
      feature_layers: override the target layers whose inputs feed ``fc``
        (HF hidden_states indices). Default: ``eagle_aux_hidden_state_layer_ids``
        + 1 from config.json, else the target's (2, L//2, L-3).
      keep_embedding: load the head's own ``embed_tokens.weight`` if it has
        one; by default it is skipped and the target's embedding is used, as
        SGLang and vLLM do.
      check_finite: as for :func:`load_target`.
      mesh: a device mesh to replicate the head on (it is small); None: the default device.
    """
    model_dir = resolve_model_dir(name_or_path, draft=True)
    dtype = parse_dtype(dtype)
    config_path = os.path.join(model_dir, "config.json")
    raw = read_json(config_path)
    fmt = head_format(raw, config_path)
    cfg = parse_eagle3(raw, where=config_path).with_overrides(rope_theta=rope_theta,
                                                                          feature_layers=feature_layers)
    if target_config is not None:
        cfg.check_target(target_config, where=f"draft head {model_dir}")
    replicated = place = None
    if mesh is not None:
        everywhere = check_mesh(mesh) and NamedSharding(mesh, PartitionSpec())

        def replicated(path: str, shape: tuple[int, ...]):
            return everywhere

        def place(path: str, array: np.ndarray) -> jax.Array:
            return put(array, everywhere)

    if converted.is_converted(model_dir):
        marker = converted.read_marker(model_dir)
        if marker.get("kind") != "draft":
            raise CheckpointError(f"{model_dir}: a converted {marker.get('kind')}, not a draft head")
        head = converted.restore_into(abstract_draft(cfg, dtype), model_dir,  # converted heads hold no embedding
                                      check_finite=check_finite, sharding_of=replicated)
    else:
        rules = eagle3_rules(keep_embedding, fmt, full_vocabulary=cfg.draft_vocab_size == cfg.vocab_size)
        pickled = torch_bin.find_bin(model_dir) if fmt == "eagle" else None
        with tempfile.TemporaryDirectory(prefix="eagle3-jax-bin-") as tmp:
            if pickled is not None:  # the EAGLE authors' pytorch_model.bin, read with the restricted unpickler
                files = [torch_bin.bin_to_safetensors(pickled, os.path.join(tmp, "model.safetensors"))]
            else:
                files = checkpoint_files(model_dir)
            head = load_safetensors_into(abstract_draft(cfg, dtype, keep_embedding), files, rules, source=model_dir,
                                         progress=progress, check_finite=check_finite, place=place)
    check_vocab_map(np.asarray(head.d2t[...]), np.asarray(head.t2d[...]), source=model_dir)
    return head


def save_draft(head: Eagle3DraftHead, output_dir: str | os.PathLike, *, embedding=None, dtype="bfloat16",
               overwrite: bool = False) -> str:
    """Exports a head as SpecForge / SGLang / vLLM load it: config.json + model.safetensors.

    Weights are written in ``dtype`` (bfloat16, as published heads are),
    ``d2t`` as int64 and ``t2d`` as bool. ``embedding`` (the target's
    [vocab, hidden] table) is written as ``embed_tokens.weight`` when the head
    has none of its own, which makes the directory self-contained for
    SpecForge. The directory appears atomically.
    """
    own = head.embed_tokens is not None
    out = os.path.abspath(os.fspath(output_dir))
    with atomic_directory(out, overwrite=overwrite, replaceable=lambda p: is_export(p, "draft"),
                          what="exported draft head") as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(eagle3_to_hf(head.config), f, indent=2)
        extra = None
        if not own and embedding is not None:
            extra = {"embed_tokens.weight": np.asarray(jax.device_get(embedding)).astype(parse_dtype(dtype))}
        export_safetensors(head, eagle3_rules(own), os.path.join(tmp, "model.safetensors"), dtype=parse_dtype(dtype),
                           extra=extra, metadata={"format": "pt", EXPORT_MARKER_KEY: "draft"})
    return out


def convert_draft(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, overwrite: bool = False,
                  progress: bool = True) -> str:
    """Converts a draft head into the orbax format (what :func:`convert_target` does for targets, dtype included)."""
    check_destination(dst, overwrite=overwrite, replaceable=converted.is_converted, what="converted checkpoint")
    model_dir = resolve_model_dir(src, draft=True)
    dtype = parse_dtype(dtype) if dtype not in (None, "keep") else checkpoint_dtype(model_dir)
    head = load_draft(model_dir, dtype=dtype, progress=progress)
    return converted.save_converted(head, model_dir, os.fspath(dst), kind="draft", overwrite=overwrite,
                                    extra={"source": os.fspath(src), "dtype": dtype.name})
