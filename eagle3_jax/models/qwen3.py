"""Qwen3 and Qwen2 / Qwen2.5 targets: the shared decoder with Qwen's flags
(``eagle3_jax/models/transformer.py``). Qwen3 normalises q and k per head;
Qwen2 has biases on q/k/v instead."""

from __future__ import annotations

from eagle3_jax.models.target import ForwardOutput
from eagle3_jax.models.transformer import DecoderLM


class Qwen3ForCausalLM(DecoderLM):
    """Qwen3 / Qwen2 causal LM (HF ``Qwen3ForCausalLM`` / ``Qwen2ForCausalLM``).

    Build one with random weights as ``Qwen3ForCausalLM(cfg, dtype=..., rngs=nnx.Rngs(0))``
    or load a checkpoint with :func:`eagle3_jax.load_target`.
    """


__all__ = ["ForwardOutput", "Qwen3ForCausalLM"]
