"""A compact PyTorch reference of the EAGLE-3 draft head, written from the
published architecture (SpecForge ``LlamaForCausalLMEagle3``; SGLang's
``llama_eagle3.py`` computes the same), float32 on CPU.

It is deliberately plain: explicit key/value lists instead of a cache object,
a boolean mask per call, and SpecForge's training-time-test attention written
the way SpecForge writes it (step-0 keys causally, the same-index key of later
steps as an elementwise product). Parameter names are exactly the checkpoint's.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(x, positions, theta):
    """x: [b, heads, t, d]; positions: [b, t]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = positions[..., None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, self.nh = cfg["hidden_size"], cfg["num_attention_heads"]
        self.nkv, self.hd = cfg["num_key_value_heads"], cfg["head_dim"]
        self.theta = cfg["rope_theta"]
        self.q_proj = nn.Linear(2 * h, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(2 * h, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(2 * h, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, h, bias=False)

    def qkv(self, u, positions):
        b, t, _ = u.shape
        q = self.q_proj(u).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(u).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(u).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        rep = self.nh // self.nkv
        return q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)

    def attend(self, q, keys, values, mask):
        """keys/values: [b, heads, s, d]; mask [b, t, s] bool."""
        w = q @ keys.transpose(2, 3) / math.sqrt(self.hd)
        w = w.masked_fill(~mask[:, None], torch.finfo(torch.float32).min)
        w = torch.softmax(w, dim=-1, dtype=torch.float32)
        out = (w @ values).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, i = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        eps = cfg["rms_norm_eps"]
        self.hidden_norm = RMSNorm(cfg["hidden_size"], eps)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)


class RefEagle3(nn.Module):
    """Reference head. ``forward`` is one call over new positions with explicit K/V history."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(3 * cfg["target_hidden_size"], cfg["hidden_size"], bias=False)
        self.midlayer = MidLayer(cfg)
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["draft_vocab_size"], bias=False)
        self.register_buffer("d2t", torch.zeros(cfg["draft_vocab_size"], dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(cfg["vocab_size"], dtype=torch.bool))

    def layer_input(self, emb, hidden, is_features):
        """(the residual, the attention input). With speculators' ``norm_before_residual`` the
        residual is ``hidden_norm(h)`` (vLLM ``_norm_before_residual``); otherwise ``h``."""
        h = self.fc(hidden) if is_features else hidden
        m = self.midlayer
        normed = m.hidden_norm(h)
        residual = normed if self.cfg.get("norm_before_residual") else h
        return residual, torch.cat([m.input_layernorm(emb), normed], dim=-1)

    def finish(self, h, attn_out):
        m = self.midlayer
        h = h + attn_out
        g = h + m.mlp(m.post_attention_layernorm(h))
        return self.lm_head(self.norm(g)), g

    def forward(self, emb, hidden, positions, past_k, past_v, mask, is_features):
        """past_k/v: [b, heads, s, d] (may be empty); mask [b, t, s + t] over (past, new)."""
        h, u = self.layer_input(emb, hidden, is_features)
        q, k, v = self.midlayer.self_attn.qkv(u, positions)
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        logits, g = self.finish(h, self.midlayer.self_attn.attend(q, keys, values, mask))
        return logits, g, keys, values

    def ttt_step(self, emb, hidden, positions, cache_hidden, causal_mask, is_features):
        """SpecForge's training-time-test attention for one unrolled step.

        ``cache_hidden`` = [keys list, values list] of earlier steps; positions
        are already shifted by the step index. Step-0 keys are attended with the
        causal mask; step i >= 1 contributes only its key at the same index.
        """
        h, u = self.layer_input(emb, hidden, is_features)
        attn = self.midlayer.self_attn
        q, k, v = attn.qkv(u, positions)
        cache_hidden[0].append(k)
        cache_hidden[1].append(v)
        w = q @ cache_hidden[0][0].transpose(2, 3) / math.sqrt(attn.hd)
        w = w.masked_fill(~causal_mask[:, None], torch.finfo(torch.float32).min)
        diag = [(q * ki).sum(-1, keepdim=True) / math.sqrt(attn.hd) for ki in cache_hidden[0][1:]]
        w = torch.softmax(torch.cat([w, *diag], dim=-1), dim=-1, dtype=torch.float32)
        t = q.shape[2]
        out = w[..., :t] @ cache_hidden[1][0]
        for i, vi in enumerate(cache_hidden[1][1:]):
            out = out + w[..., t + i: t + i + 1] * vi
        out = attn.o_proj(out.transpose(1, 2).reshape(q.shape[0], t, -1))
        return self.finish(h, out)


def make_reference_head(path, *, seed=0, hidden=40, heads=4, kv_heads=2, head_dim=12, intermediate=56,
                        vocab=97, draft_vocab=31, target_hidden=40, rope_theta=10000.0, aux_layer_ids=None,
                        extra_config=None, with_embedding=False):
    """Random reference head saved in the exact checkpoint format (config.json + model.safetensors)."""
    cfg = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
               intermediate_size=intermediate, vocab_size=vocab, draft_vocab_size=draft_vocab,
               target_hidden_size=target_hidden, rope_theta=rope_theta, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    ref = RefEagle3(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.25)
        rng = np.random.default_rng(seed)
        ids = np.sort(rng.choice(vocab, size=draft_vocab, replace=False))
        ref.d2t.copy_(torch.from_numpy(ids - np.arange(draft_vocab)))
        t2d = np.zeros(vocab, bool)
        t2d[ids] = True
        ref.t2d.copy_(torch.from_numpy(t2d))
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if with_embedding:
        tensors["embed_tokens.weight"] = torch.randn(vocab, hidden)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
              "hidden_act": "silu", "max_position_embeddings": 1024, "tie_word_embeddings": False, **cfg}
    if aux_layer_ids is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids)}
    config.update(extra_config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return ref, ids


def specforge_padding(t, left=False):
    """SpecForge's ``padding``: shift by one along dim 1, zero-filled."""
    zero = torch.zeros_like(t[:, -1:])
    return torch.cat((zero, t[:, :-1]), 1) if left else torch.cat((t[:, 1:], zero), 1)


def specforge_ttt_loss(ref, input_ids, features, target_logits, loss_mask, valid, embed_table, length, decay=0.8):
    """SpecForge's online EAGLE-3 objective (OnlineEagle3Model.forward with the sdpa backend), written plainly.

    Args: torch tensors; ``target_logits`` are the target's unshifted logits [B, T, V].
    Returns: (total loss, per-step losses, per-step accuracies).
    """
    target = specforge_padding(target_logits)  # target[t] = logits at t+1
    input_ids = specforge_padding(input_ids)
    loss_mask = loss_mask[..., None].float()
    t2d = ref.t2d
    target_ids = target.argmax(-1)
    position_mask = t2d[target_ids][..., None].float() * loss_mask
    target_p = torch.softmax(target[..., t2d], dim=2)
    b, t, vd = target_p.shape
    target_p = torch.nn.functional.pad(target_p, (0, 0, 0, length), value=1 / vd)
    target_ids = torch.nn.functional.pad(target_ids, (0, length), value=0)
    positions = torch.arange(t)[None].expand(b, t)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))[None] & valid[:, None, :]
    hidden = features
    cache_hidden = [[], []]
    losses, accs = [], []
    for idx in range(length):
        embeds = embed_table[input_ids]
        logits, hidden = ref.ttt_step(embeds, hidden, positions + idx, cache_hidden, causal, idx == 0)
        p = target_p[:, idx: idx + t]
        logp = torch.log_softmax(logits.float(), dim=2)
        losses.append(-torch.sum(position_mask * p * logp, 2).mean())
        with torch.no_grad():
            pred = logits.argmax(-1)
            pred = pred + ref.d2t[pred]
            correct = ((pred == target_ids[:, idx: idx + t]) * loss_mask.squeeze(-1)).sum()
            accs.append(correct / loss_mask.sum().clamp_min(1e-6))
        input_ids = specforge_padding(input_ids)
        position_mask = specforge_padding(position_mask)
        loss_mask = specforge_padding(loss_mask)
    total = sum(decay ** i * loss for i, loss in enumerate(losses))
    return total, losses, accs
