"""``eagle3-jax demo``: an offline end-to-end run that needs no download.

Until the project ships its own trained demo target and head, the demo builds
a small random-weight model of the Qwen3 architecture in memory and runs the
jit-compiled decode loop on a batch of prompts of different lengths. The
tokens are meaningless; the run shows that the install works and how fast
the loop is on this machine.
"""

from __future__ import annotations

import jax
from flax import nnx

from eagle3_jax.config import Qwen3Config
from eagle3_jax.generation import Generator
from eagle3_jax.models.qwen3 import Qwen3ForCausalLM

DEMO_CONFIG = Qwen3Config(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
                          max_position_embeddings=2048)


def run_demo(max_new_tokens: int = 64, seed: int = 0) -> dict:
    """Runs the demo; returns its figures as a dict."""
    model = Qwen3ForCausalLM(DEMO_CONFIG, rngs=nnx.Rngs(seed))
    prompts = [[(7 * i + 3) % DEMO_CONFIG.vocab_size for i in range(n)] for n in (5, 12, 20)]
    gen = Generator(model)
    first = gen.generate(prompts, max_new_tokens=max_new_tokens, stop_token_ids=())
    again = gen.generate(prompts, max_new_tokens=max_new_tokens, stop_token_ids=())
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    out = again[0]
    return {
        "model": "random-weight Qwen3 architecture (4 layers, hidden 128, vocab 1024)",
        "backend": jax.default_backend(),
        "batch": len(prompts),
        "new_tokens_per_prompt": [len(o.token_ids) for o in again],
        "first_tokens": again[0].token_ids[:12],
        "compile_seconds": first[0].compile_seconds,
        "prefill_seconds": out.prefill_seconds,
        "decode_seconds": out.decode_seconds,
        "tokens_per_second_per_prompt": out.tokens_per_second,
        "recompiled_on_second_call": again[0].compile_seconds > 0,
    }
