"""Checkpoint-name <-> parameter-path rules, with explicit transforms.

A rule pairs a checkpoint tensor name template with an NNX parameter path
template; ``{i}`` stands for a layer index. Rules work both ways, so one table
drives loading (checkpoint -> params) and export (params -> checkpoint).
The only transform is ``transpose``: HF ``nn.Linear`` stores [out, in] and
Flax ``nnx.Linear`` stores its kernel [in, out].
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

import numpy as np


@functools.cache
def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One tensor: ``checkpoint`` name template <-> ``param`` path template."""

    checkpoint: str
    param: str
    transpose: bool = False
    file_dtype: str | None = None  # exact dtype required in the file (e.g. 'int64' for d2t)
    # the value when the checkpoint lacks the tensor: (shape, dtype) -> array; None makes it required
    default: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None

    def to_param(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array.T) if self.transpose else array

    def to_checkpoint(self, array: np.ndarray) -> np.ndarray:
        if self.file_dtype is not None:
            array = array.astype(self.file_dtype)
        return np.ascontiguousarray(array.T) if self.transpose else array


@dataclasses.dataclass(frozen=True)
class RuleTable:
    """An ordered set of rules plus checkpoint names that are known and skipped.

    ``ignore`` holds regexes of checkpoint tensors that are legitimately
    present but unused (e.g. a tied ``lm_head.weight``, RoPE buffers).
    """

    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()

    def param_path(self, name: str) -> tuple[str, Rule] | None:
        """The parameter path (dotted) a checkpoint tensor maps to, or None."""
        for rule in self.rules:
            m = _template_regex(rule.checkpoint).match(name)
            if m:
                return rule.param.replace("{i}", m.groupdict().get("i") or ""), rule
        return None

    def checkpoint_name(self, path: str) -> tuple[str, Rule] | None:
        """The checkpoint tensor name a (dotted) parameter path maps to, or None."""
        for rule in self.rules:
            m = _template_regex(rule.param).match(path)
            if m:
                return rule.checkpoint.replace("{i}", m.groupdict().get("i") or ""), rule
        return None

    def ignored(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignore)


def decoder_lm_rules(tie_word_embeddings: bool) -> RuleTable:
    """HF ``Qwen3ForCausalLM`` / ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` names ->
    ``eagle3_jax.models.transformer.DecoderLM`` params (the three share their names;
    a rule for a tensor an architecture lacks, such as ``q_norm`` in Llama, never matches)."""
    layer = "model.layers.{i}."
    rules = [Rule("model.embed_tokens.weight", "model.embed_tokens.embedding")]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules.append(Rule(f"{layer}self_attn.{proj}.weight", f"{layer}self_attn.{proj}.kernel", transpose=True))
        rules.append(Rule(f"{layer}self_attn.{proj}.bias", f"{layer}self_attn.{proj}.bias"))
    for norm in ("q_norm", "k_norm"):
        rules.append(Rule(f"{layer}self_attn.{norm}.weight", f"{layer}self_attn.{norm}.weight"))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        rules.append(Rule(f"{layer}{norm}.weight", f"{layer}{norm}.weight"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(f"{layer}mlp.{proj}.weight", f"{layer}mlp.{proj}.kernel", transpose=True))
    rules.append(Rule("model.norm.weight", "model.norm.weight"))
    ignore = [r"model\.rotary_emb\.inv_freq", r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
    if tie_word_embeddings:
        ignore.append(r"lm_head\.weight")  # some tied checkpoints store a copy; the embedding is used
    else:
        rules.append(Rule("lm_head.weight", "lm_head.kernel", transpose=True))
    return RuleTable(tuple(rules), tuple(ignore))


qwen3_rules = decoder_lm_rules  # the name it had before Llama shared it


# Where each head format keeps its decoder layer (eagle3_jax/hf_heads.py: head_format).
HEAD_LAYER_PREFIX = {"specforge": "midlayer.", "eagle": "midlayer.", "speculators": "layers.0."}


def _identity_d2t(shape, dtype):
    return np.zeros(shape, dtype)


def _identity_t2d(shape, dtype):
    return np.ones(shape, dtype)


def eagle3_rules(own_embedding: bool, head_format: str = "specforge", full_vocabulary: bool = False) -> RuleTable:
    """Draft-head checkpoint names -> ``eagle3_jax.models.eagle3`` params, for each published format.

    SpecForge / SGLang and the EAGLE authors name the decoder layer
    ``midlayer.*``; speculators names it ``layers.0.*``. ``embed_tokens.weight``
    is loaded only into a head that keeps its own embedding; otherwise it is
    skipped, and the target's embedding is used (as SGLang and vLLM do). With
    ``full_vocabulary`` (draft vocabulary = target vocabulary) ``d2t`` and
    ``t2d`` may be absent, as the EAGLE authors and speculators then omit
    them: the map is the identity.
    """
    mid = HEAD_LAYER_PREFIX[head_format]
    rules = [Rule("fc.weight", "fc.kernel", transpose=True)]
    for norm in ("hidden_norm", "input_layernorm", "post_attention_layernorm"):
        rules.append(Rule(f"{mid}{norm}.weight", f"midlayer.{norm}.weight"))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules.append(Rule(f"{mid}self_attn.{proj}.weight", f"midlayer.self_attn.{proj}.kernel", transpose=True))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(f"{mid}mlp.{proj}.weight", f"midlayer.mlp.{proj}.kernel", transpose=True))
    rules += [
        Rule("norm.weight", "norm.weight"),
        Rule("lm_head.weight", "lm_head.kernel", transpose=True),
        Rule("d2t", "d2t", file_dtype="int64", default=_identity_d2t if full_vocabulary else None),
        Rule("t2d", "t2d", file_dtype="bool", default=_identity_t2d if full_vocabulary else None),
    ]
    ignore = []
    if own_embedding:
        rules.append(Rule("embed_tokens.weight", "embed_tokens.embedding"))
    else:
        ignore.append(r"embed_tokens\.weight")
    return RuleTable(tuple(rules), tuple(ignore))
