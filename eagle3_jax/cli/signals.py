"""Ctrl-C and SIGTERM during a command, made reliable.

Python turns SIGINT into a ``KeyboardInterrupt`` wherever the main thread
is, and some code swallows it: a ``KeyboardInterrupt`` raised inside a
garbage-collector callback (JAX registers one) is printed as "Exception
ignored" and dropped, and importing ``torch`` (which ``transformers`` does)
catches every exception around parts of its import. A Ctrl-C that lands
there is lost, and a server would go on starting and serve.
:class:`InterruptGuard` remembers the signal as well as raising the
interrupt, and :func:`check` raises it again at the next checkpoint (the
server's start-up checks between its phases), so the process stops within
one phase whatever swallowed it (and the "Exception ignored" report of an
interrupt dropped by a callback is not printed: it is not lost). SIGTERM is
treated as Ctrl-C, so that a
command's clean-up runs (partial outputs removed) rather than the process
dying where it stands.
"""

from __future__ import annotations

import signal
import sys
import threading

_received: int | None = None  # the first signal a guard caught since the outermost guard began
_depth = 0


class InterruptGuard:
    """A context in which ``signals`` raise ``KeyboardInterrupt`` and are remembered for :func:`check`;
    the previous handlers come back when it exits. Outside the main thread it does nothing.

    Args:
      signals: the signals to guard.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self._previous: dict[int, object] = {}

    def __enter__(self) -> InterruptGuard:
        global _received, _depth
        if threading.current_thread() is not threading.main_thread():
            return self
        if _depth == 0:
            _received = None
        _depth += 1
        self._previous = {s: signal.signal(s, _handle) for s in self.signals}
        self._unraisable = sys.unraisablehook
        sys.unraisablehook = _quiet_interrupts(self._unraisable)
        return self

    def __exit__(self, *exc) -> None:
        global _depth
        if not self._previous:
            return
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        sys.unraisablehook = self._unraisable
        _depth -= 1


def _quiet_interrupts(hook):
    """``hook``, except for the interrupts our handler raised (remembered for :func:`check`)."""

    def unraisable(info) -> None:
        if isinstance(info.exc_value, KeyboardInterrupt) and _received is not None:
            return
        hook(info)

    return unraisable


def _handle(signum, _frame) -> None:
    global _received
    if _received is None:
        _received = signum
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a guarded signal came since the outermost guard began."""
    return _received is not None


def check() -> None:
    """Raises ``KeyboardInterrupt`` if a guarded signal came (even one whose interrupt was swallowed)."""
    if _received is not None:
        raise KeyboardInterrupt


__all__ = ["InterruptGuard", "check", "interrupted"]
