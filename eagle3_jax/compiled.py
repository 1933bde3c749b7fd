"""Ahead-of-time compilation with an explicit executable cache.

``jax.jit`` already caches compilations, but it hides how long they took and
whether one happened. Generation reports compile time apart from run time and
the tests assert that a second call does not recompile, so hot functions go
through :class:`CompiledFunction`, which compiles once per (static arguments,
argument shapes and dtypes) and counts its compilations.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax


def _signature(tree: Any):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in leaves)


class CompiledFunction:
    """``fn(*static, *dynamic)`` compiled per distinct static values and dynamic shapes.

    Args:
      fn: the function; its first ``num_static`` positional arguments must be hashable.
      num_static: how many leading arguments are static.
      donate_argnums: positions (counted over all arguments) of buffers to donate.
    """

    def __init__(self, fn: Callable, *, num_static: int, donate_argnums: tuple[int, ...] = ()):
        self.num_static = num_static
        self._jitted = jax.jit(fn, static_argnums=tuple(range(num_static)), donate_argnums=donate_argnums)
        self._executables: dict[Any, Any] = {}
        self.num_compiles = 0
        self.__name__ = getattr(fn, "__name__", "compiled")

    def __call__(self, *args) -> tuple[Any, float]:
        """Runs the function; returns (outputs, seconds spent compiling in this call)."""
        static, dynamic = args[: self.num_static], args[self.num_static:]
        key = (static, _signature(dynamic))
        executable = self._executables.get(key)
        compile_seconds = 0.0
        if executable is None:
            t0 = time.perf_counter()
            executable = self._jitted.lower(*args).compile()
            compile_seconds = time.perf_counter() - t0
            self._executables[key] = executable
            self.num_compiles += 1
        return executable(*dynamic), compile_seconds
