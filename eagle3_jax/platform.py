"""The platform a program is traced for (docs/architecture.md#compiled-programs).

Programs are usually compiled for the devices they run on, and then the
platform is ``jax.default_backend()``. Ahead-of-time compilation for other
chips (``eagle3-jax compile``: TPU programs compiled on a CPU machine through
libtpu) traces on one platform for another; inside :func:`compiling_for` the
choices made while tracing follow the target: which attention backend
``auto`` stands for, how the KV cache reads and writes a row's window
(``kv_cache.py``), whether Pallas kernels run in interpret mode.

This module imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("eagle3_jax_target_platform", default=None)


def target_platform() -> str:
    """"cpu", "gpu" or "tpu": the platform programs traced now are compiled for."""
    return _TARGET.get() or target_platform_of(jax.default_backend())


def executes_here() -> bool:
    """Whether programs traced now run on this process's own default devices (False while
    compiling ahead of time for another platform)."""
    return target_platform() == target_platform_of(jax.default_backend())


def target_platform_of(name: str) -> str:
    """A JAX backend or platform name as one of :data:`PLATFORMS` ("cuda" and "rocm" are "gpu")."""
    return "gpu" if name in ("cuda", "rocm") else name


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Traces inside the block as for ``platform`` ("cpu", "gpu" or "tpu")."""
    platform = target_platform_of(platform)
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; choose one of {', '.join(PLATFORMS)}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
