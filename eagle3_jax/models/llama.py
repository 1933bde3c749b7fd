"""Llama targets (Llama 2, 3, 3.1, 3.2, 3.3): the shared decoder with Llama's
flags (``eagle3_jax/models/transformer.py``): no q/k norm, ``attention_bias``
on q/k/v/o, ``llama3`` RoPE scaling, tied (3.2 1B/3B) or untied embeddings."""

from __future__ import annotations

from eagle3_jax.models.transformer import DecoderLM


class LlamaForCausalLM(DecoderLM):
    """Llama causal LM (HF ``LlamaForCausalLM``).

    Build one with random weights as ``LlamaForCausalLM(cfg, dtype=..., rngs=nnx.Rngs(0))``
    or load a checkpoint with :func:`eagle3_jax.load_target`.
    """


__all__ = ["LlamaForCausalLM"]
