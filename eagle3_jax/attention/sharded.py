"""Attention on a device mesh: each shard attends over its own rows and KV heads
(docs/architecture.md#device-mesh).

Attention is independent per (batch row, KV head): a query head reads only
its group's KV head. So on a mesh, :func:`eagle3_jax.attention.attend` runs
the backend inside ``jax.shard_map`` over the cache's layout
(``KVCache.axes``: rows on ``data``, KV heads on ``tensor``), one layer's
buffers at a time: every backend -- the block loop with its traced trip
count, the Pallas kernel, which XLA's partitioner can not split -- sees an
ordinary single-device problem, and the write and the read need no
communication. The query heads of a shard are the groups of its KV heads
(heads are split in contiguous blocks on both sides).

A cache whose KV heads are whole on the tensor axis (the draft head's, or a
target whose KV heads the axis does not divide) is attended in full on every
device of a tensor group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from eagle3_jax.attention.metadata import AttentionMetadata
from eagle3_jax.axes import logical_spec
from eagle3_jax.kv_cache import KVCache


def sharded_attention(backend: Callable, mesh, q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, layer: int,
                      meta: AttentionMetadata) -> tuple[jax.Array, KVCache]:
    """``backend(q, k, v, cache, layer, meta)`` run per shard of ``mesh`` (shapes as for ``attend``)."""
    buffer = logical_spec(cache.k[layer].shape, cache.axes, dict(mesh.shape))
    rows, heads = buffer[0], buffer[1]
    tokens = P(rows, None, heads, None)  # q, k, v and the output: [batch, T, heads, head_dim]
    mask_rows = rows if meta.local_mask.shape[0] == q.shape[0] else None
    meta_spec = dataclasses.replace(meta, positions=P(rows, None), slots=P(rows, None), kv_lengths=P(rows),
                                    local_mask=P(mask_rows, None, None))
    view = cache.layer_view(layer)
    view_spec = dataclasses.replace(view, k=(buffer,), v=(buffer,), lengths=P(rows))

    def per_shard(q, k, v, view, meta):
        out, view = backend(q, k, v, view, 0, meta)
        return out, view.k[0], view.v[0]

    out, k_layer, v_layer = jax.shard_map(per_shard, mesh=mesh, in_specs=(tokens, tokens, tokens, view_spec, meta_spec),
                                          out_specs=(tokens, buffer, buffer), check_vma=False)(q, k, v, view, meta)
    return out, cache.with_layer(layer, k_layer, v_layer)
