"""How much memory a generation needs, checked before anything is allocated.

A KV cache is static: its size follows ``max_cache_len`` (or
``max_new_tokens``), not the text. A careless ``--max-cache-len 1000000000``
would end in an XLA ``RESOURCE_EXHAUSTED`` traceback, or on the CPU in the
kernel's out-of-memory killer. :func:`check_generation_memory` estimates the
buffers of a generation from the shapes alone (the KV caches, the result
buffers, and the largest transient: the attention scores of a prefill chunk,
of the draft's prompt extend or of a tree verification) and refuses with the
bytes needed and the bytes free.

The estimate is a lower bound of what XLA allocates (it ignores fusion
temporaries), so a refusal is certain to be right; a generation that passes
may still exhaust memory when it is close to the limit.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from eagle3_jax.errors import InputError

_F32 = 4
_I32 = 4


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup v2 memory limit, if it has one."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            current = int(f.read().strip())
        return max(0, int(limit) - current)
    except (OSError, ValueError):
        return None


def _host_free() -> int | None:
    """Available host memory (Linux MemAvailable, else free physical pages)."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limited = _cgroup_free()
    return free if limited is None else min(free, limited)


def available_bytes() -> tuple[int | None, str]:
    """(free bytes, where) on the default device: accelerator memory, or host memory for the CPU."""
    import jax

    device = jax.local_devices()[0]
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
        except Exception:  # a backend without memory statistics
            stats = {}
        limit = stats.get("bytes_limit")
        if limit:
            return int(limit) - int(stats.get("bytes_in_use", 0)), f"{device.device_kind} memory"
        return None, f"{device.device_kind} memory"
    return _host_free(), "host memory"


def generation_bytes(config: Any, *, batch: int, bucket: int, capacity: int, max_new_tokens: int,
                     cache_dtype: Any, draft_config: Any = None, num_draft_tokens: int = 0,
                     headroom: int = 0, prefill_chunk: int = 512, attention: str = "auto",
                     data_parallel: int = 1, kv_shards: int = 1) -> dict[str, int]:
    """The main buffers of one generation, by part, in bytes (per device on a mesh).

    The caches are counted at the size the decoders allocate
    (``kv_cache.aligned_capacity``). The largest transient is a forward's
    attention scores: over every slot with the ``reference`` backend, over a
    prefix block plus the forward's own tokens with the live-length ones.

    Args:
      config: the target's config; draft_config: the head's, or None for plain decoding.
      batch, bucket: the padded prompt batch shape.
      capacity: KV slots per row asked for; headroom: the extra slots of the
        speculative tree (allocated for the target and the draft).
      max_new_tokens: the result buffer width.
      num_draft_tokens: tree nodes verified per cycle (0 for plain decoding).
      attention: the attention backend's name.
      data_parallel: devices the batch is split over (rows per device: batch / data_parallel).
      kv_shards: devices the target's KV heads are split over (its tensor
        axis when that divides them, else 1).
    """
    from eagle3_jax.attention import resolve_backend
    from eagle3_jax.attention.blockwise import PREFIX_BLOCK
    from eagle3_jax.kv_cache import aligned_capacity

    item = np.dtype(cache_dtype).itemsize
    batch = -(-batch // data_parallel)
    slots = aligned_capacity(capacity + headroom)
    dense = resolve_backend(attention) == "reference"

    def width(new_tokens: int) -> int:  # key slots scored at once by a forward of new_tokens
        return slots if dense else min(slots, new_tokens + PREFIX_BLOCK)

    parts = {"target KV cache": 2 * config.num_hidden_layers * batch * config.num_key_value_heads * slots
             * config.head_dim * item // kv_shards}
    chunk = min(bucket, prefill_chunk)
    transients = [batch * config.num_attention_heads * chunk * width(chunk) * _F32 // kv_shards]
    results = batch * max_new_tokens * _I32
    if draft_config is not None:
        parts["draft KV cache"] = 2 * batch * draft_config.num_key_value_heads * slots * draft_config.head_dim * item
        transients.append(batch * draft_config.num_attention_heads * bucket * width(bucket) * _F32)
        transients.append(batch * config.num_attention_heads * num_draft_tokens * width(num_draft_tokens) * _F32
                          // kv_shards)
        results *= 2  # the accept lengths beside the tokens
    parts["result buffers"] = results
    parts["attention scores"] = 2 * max(transients)  # scores and their softmax
    return parts


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**26 else f"{n / 2**20:.1f} MiB"


def check_generation_memory(config: Any, *, extra_bytes: int = 0, devices: int = 1, **shapes: Any) -> int:
    """Raises InputError when a generation of these shapes can not fit in free memory; returns the bytes needed
    (per device).

    ``extra_bytes`` adds memory not yet allocated (the weights, when the check
    runs before loading). ``devices``: the mesh's devices in this process; on
    the CPU they all share the host's memory. The other keyword arguments are those of
    :func:`generation_bytes`.
    """
    parts = generation_bytes(config, **shapes)
    if extra_bytes:
        parts["weights"] = extra_bytes
    needed = sum(parts.values())
    free, where = available_bytes()
    if where == "host memory" and devices > 1:  # simulated CPU devices: one memory for all of them
        parts = {k: v * devices for k, v in parts.items()}
        needed *= devices
    if free is not None and needed > free:
        detail = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if v)
        raise InputError(
            f"this generation needs at least {_gib(needed)} ({detail}) but only {_gib(free)} of {where} is free "
            f"(batch {shapes.get('batch')}, {shapes.get('capacity')} KV slots per row); lower max_cache_len "
            "(--max-cache-len), max_new_tokens or the batch size")
    return needed
