"""Ahead-of-time compilation with an explicit executable cache.

``jax.jit`` already caches compilations, but it hides how long they took and
whether one happened. Generation reports compile time apart from run time and
the tests assert that a second call does not recompile, so hot functions go
through :class:`CompiledFunction`, which compiles once per (static arguments,
argument shapes and dtypes), counts its compilations, and keeps the
``MAX_EXECUTABLES`` most recently used programs.
"""

from __future__ import annotations

import collections
import time
import weakref
from typing import Any, Callable

import jax

# Compiled programs kept per function. Each holds its machine code (on the CPU, memory
# mappings of its own: a process that kept every program it ever compiled would end at the
# kernel's limit of mappings), so the least recently used are dropped past this many.
MAX_EXECUTABLES = 32


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

    _instances: "weakref.WeakSet[CompiledFunction]" = weakref.WeakSet()

    def __init__(self, fn: Callable, *, num_static: int, donate_argnums: tuple[int, ...] = (),
                 max_executables: int = MAX_EXECUTABLES):
        self.num_static = num_static
        self.max_executables = max_executables
        self._jitted = jax.jit(fn, static_argnums=tuple(range(num_static)), donate_argnums=donate_argnums)
        self._executables: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self.num_compiles = 0
        self.__name__ = getattr(fn, "__name__", "compiled")
        CompiledFunction._instances.add(self)

    def clear(self) -> None:
        """Drops this function's compiled programs (the next call of each shape compiles again)."""
        self._executables.clear()

    @classmethod
    def clear_all(cls) -> None:
        """Drops every compiled program of every CompiledFunction and JAX's own caches."""
        for fn in list(cls._instances):
            fn.clear()
        jax.clear_caches()

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
            while len(self._executables) > self.max_executables:
                self._executables.popitem(last=False)
        else:
            self._executables.move_to_end(key)
        return executable(*dynamic), compile_seconds
