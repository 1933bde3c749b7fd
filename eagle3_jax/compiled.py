"""Ahead-of-time compilation with an explicit executable cache.

``jax.jit`` already caches compilations, but it hides how long they took and
whether one happened. Generation reports compile time apart from run time and
the tests assert that a second call does not recompile, so hot functions go
through :class:`CompiledFunction`, which compiles once per (static arguments,
argument shapes, dtypes and shardings, and the mesh set with ``jax.set_mesh``), counts its compilations, and keeps the
``MAX_EXECUTABLES`` most recently used programs.

A compilation that is not in that cache is announced to the listeners added
with :func:`add_compile_listener` (and logged on the ``eagle3_jax.compiled``
logger at INFO): a :class:`CompileEvent` before it and one after it, which
says how long it took and whether JAX's persistent compilation cache
(:mod:`eagle3_jax.compile_cache`) served it. The CLI prints them on stderr.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import jax

logger = logging.getLogger("eagle3_jax.compiled")

# Compiled programs kept per function. Each holds its machine code (on the CPU, memory
# mappings of its own: a process that kept every program it ever compiled would end at the
# kernel's limit of mappings), so the least recently used are dropped past this many.
MAX_EXECUTABLES = 32


@dataclasses.dataclass(frozen=True)
class CompileEvent:
    """A compilation of a :class:`CompiledFunction`, before (``done`` False) and after it.

    Attributes:
      what: what is compiled, e.g. 'the speculative loop (batch 1, cache 256, tree 4,1,5)'.
      done: False when it starts, True when it has finished.
      seconds: how long it took (0 at the start).
      from_cache: at the end, whether every program came from the persistent compilation cache.
    """

    what: str
    done: bool
    seconds: float = 0.0
    from_cache: bool = False


CompileListener = Callable[[CompileEvent], None]
_listeners: list[CompileListener] = []


def add_compile_listener(listener: CompileListener) -> Callable[[], None]:
    """Calls ``listener(event)`` around every compilation; returns the function that removes it."""
    _listeners.append(listener)

    def remove() -> None:
        if listener in _listeners:
            _listeners.remove(listener)

    return remove


def _announce(event: CompileEvent) -> None:
    if event.done:
        how = "loaded from the compilation cache" if event.from_cache else "compiled"
        logger.info("%s %s in %.1f s", how, event.what, event.seconds)
    else:
        logger.info("compiling %s", event.what)
    for listener in list(_listeners):
        listener(event)


class _CacheCounts(threading.local):
    requests = 0
    hits = 0


_counts = _CacheCounts()
_counting = False
_counting_lock = threading.Lock()


def _count_cache_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/compile_requests_use_cache":
        _counts.requests += 1
    elif event == "/jax/compilation_cache/cache_hits":
        _counts.hits += 1


def _start_counting() -> None:
    """Listens (once per process) to JAX's persistent-cache events, counted per thread."""
    global _counting
    with _counting_lock:
        if not _counting:
            jax.monitoring.register_event_listener(_count_cache_event)
            _counting = True


def _signature(tree: Any):
    """What a compiled program is specific to: the tree's structure and each leaf's shape, dtype and
    sharding (on a device mesh, the same shapes laid out otherwise are another program)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None))
                          for x in leaves)


class CompiledFunction:
    """``fn(*static, *dynamic)`` compiled per distinct static values and dynamic shapes.

    Args:
      fn: the function; its first ``num_static`` positional arguments must be hashable.
      num_static: how many leading arguments are static.
      donate_argnums: positions (counted over all arguments) of buffers to donate.
      describe: what a compilation is, for the messages: a string, or a function of the
        call's arguments that returns one (default: the function's name).
    """

    _instances: weakref.WeakSet[CompiledFunction] = weakref.WeakSet()

    def __init__(self, fn: Callable, *, num_static: int, donate_argnums: tuple[int, ...] = (),
                 max_executables: int = MAX_EXECUTABLES, describe: str | Callable[..., str] | None = None):
        self.describe = describe
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
        key = (static, _signature(dynamic), jax.sharding.get_abstract_mesh())
        executable = self._executables.get(key)
        compile_seconds = 0.0
        if executable is None:
            what = self._what(args)
            _announce(CompileEvent(what, done=False))
            _start_counting()
            requests, hits = _counts.requests, _counts.hits
            t0 = time.perf_counter()
            executable = self._jitted.lower(*args).compile()
            compile_seconds = time.perf_counter() - t0
            requests, hits = _counts.requests - requests, _counts.hits - hits
            _announce(CompileEvent(what, done=True, seconds=compile_seconds,
                                   from_cache=requests > 0 and hits == requests))
            self._executables[key] = executable
            self.num_compiles += 1
            while len(self._executables) > self.max_executables:
                self._executables.popitem(last=False)
        else:
            self._executables.move_to_end(key)
        return executable(*dynamic), compile_seconds

    def eval_shape(self, *args) -> Any:
        """The outputs' shapes and dtypes for these arguments, traced only (nothing compiled or run)."""
        return self._jitted.eval_shape(*args)

    def _what(self, args) -> str:
        if callable(self.describe):
            try:
                return self.describe(*args)
            except Exception:  # a message is not worth failing a generation
                return self.__name__
        return self.describe or self.__name__
