"""Tiny targets and draft heads for the speculative-decoding tests.

``fit_head`` trains a head on its target's own greedy continuations with a
short training-time-test unroll (plain optax Adam on the library's module and
``ttt_mask``), so that the tests also exercise long accepted runs, not only
the rejections a random head produces.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eagle3_jax import Eagle3Config, Eagle3DraftHead, Generator, KVCache, Qwen3Config, Qwen3ForCausalLM
from eagle3_jax.attention import AttentionMetadata
from eagle3_jax.training.ttt_attention import ttt_mask


def tiny_target(seed=0, vocab=97, init_std=0.2, layers=4, max_pos=512) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=40, intermediate_size=56, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=1e4,
                      max_position_embeddings=max_pos, eos_token_ids=(5,))
    return Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(seed), init_std=init_std)


def random_head(target, seed=1, draft_vocab=None, config=None) -> Eagle3DraftHead:
    cfg = config or Eagle3Config.for_target(target.config, draft_vocab_size=draft_vocab or target.config.vocab_size)
    head = Eagle3DraftHead(cfg, rngs=nnx.Rngs(seed))
    if cfg.draft_vocab_size < cfg.vocab_size:  # a non-trivial vocabulary map: every other target id
        ids = np.sort(np.random.default_rng(seed).choice(cfg.vocab_size, cfg.draft_vocab_size, replace=False))
        head.d2t.value = jnp.asarray(ids - np.arange(cfg.draft_vocab_size), jnp.int32)
        t2d = np.zeros(cfg.vocab_size, bool)
        t2d[ids] = True
        head.t2d.value = jnp.asarray(t2d)
    return head


def target_features(target, seqs):
    """Features [B, T, 3H] of full sequences [B, T]."""
    layers = Eagle3Config.for_target(target.config).feature_layers(target.config)
    return target.forward_sequence(jnp.asarray(seqs), feature_layers=layers,
                                   logits_indices=jnp.zeros((seqs.shape[0], 0), jnp.int32)).features


def fit_head(target, *, seed=0, num_seqs=96, prompt_len=6, new_tokens=26, ttt=4, steps=400, lr=3e-3, config=None):
    """A head fitted to ``target``'s greedy continuations (full draft vocabulary)."""
    rng = np.random.default_rng(seed)
    vocab = target.config.vocab_size
    prompts = [rng.integers(6, vocab, size=prompt_len).tolist() for _ in range(num_seqs)]
    outs = Generator(target).generate(prompts, max_new_tokens=new_tokens, stop_token_ids=())
    seqs = np.array([p + o.token_ids for p, o in zip(prompts, outs)], np.int32)  # [B, T]
    feats = target_features(target, seqs)
    embeds = target.embed(jnp.asarray(seqs))
    head = random_head(target, seed=seed + 1, config=config)
    graphdef, params, rest = nnx.split(head, nnx.Param, ...)
    b, t = seqs.shape
    seq_len = t - 1 - ttt  # positions whose labels exist for every unrolled step
    opt = optax.adam(lr)
    opt_state = opt.init(params)

    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest)
        cache = KVCache.create(num_layers=1, batch=b, capacity=ttt * seq_len, kv_heads=model.config.num_key_value_heads,
                               head_dim=model.config.head_dim, dtype=jnp.float32)
        hidden = feats[:, :seq_len]
        base = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (b, seq_len))
        total = 0.0
        for step in range(ttt):
            out = model(embeds[:, 1 + step: 1 + step + seq_len], hidden, cache,
                        AttentionMetadata.dense(base + step, base + step * seq_len,
                                                jnp.broadcast_to(ttt_mask(seq_len, step, ttt),
                                                                 (b, seq_len, ttt * seq_len))),
                        hidden_is_features=step == 0)
            labels = jnp.asarray(seqs[:, 2 + step: 2 + step + seq_len])
            total = total + (0.8 ** step) * optax.softmax_cross_entropy_with_integer_labels(out.logits, labels).mean()
            cache, hidden = out.cache, out.hidden
        return total

    @jax.jit
    def update(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for _ in range(steps):
        params, opt_state, loss = update(params, opt_state)
    return nnx.merge(graphdef, params, rest), float(loss)


@functools.cache
def fitted_pair(seed=0):
    target = tiny_target(seed)
    head, _ = fit_head(target, seed=seed)
    return target, head
