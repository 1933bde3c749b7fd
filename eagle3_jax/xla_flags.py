"""XLA flags that eagle3-jax recommends, applied by :func:`apply_default_flags`.

On NVIDIA GPUs the skinny matrix products of decoding stream weights much
faster through cuBLAS than through XLA's default Triton GEMM (2.7 vs 1.1
TB/s on an H200; docs/architecture.md#performance), so Triton GEMM is
turned off. The flag is ignored on CPU and TPU.

Importing eagle3_jax changes nothing: the ``eagle3-jax`` command line calls
:func:`apply_default_flags` first thing, and a library user calls
``eagle3_jax.apply_default_flags()`` before JAX starts a backend (before the
first computation or ``jax.devices()``; importing JAX is fine). Set
``EAGLE3_JAX_KEEP_XLA_FLAGS=1`` to leave ``XLA_FLAGS`` untouched; a flag
already present in ``XLA_FLAGS`` always wins.
"""

import os

DEFAULT_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def apply_default_flags() -> None:
    """Adds :data:`DEFAULT_FLAGS` to ``$XLA_FLAGS`` (those not already set there).

    Does nothing when ``EAGLE3_JAX_KEEP_XLA_FLAGS`` is set. It has an effect
    only before JAX starts a backend, since XLA reads the flags then.
    """
    if os.environ.get("EAGLE3_JAX_KEEP_XLA_FLAGS"):
        return
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in DEFAULT_FLAGS if f.split("=")[0] not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
