"""Request preparation off the event loop, bounded in time.

Parsing a request's JSON, rendering its chat template and tokenizing its
prompt cost time in proportion to what the client sent (and a chat template
is code). :class:`Offloader` runs that work on a few worker threads, so the
event loop keeps serving ``/health``, streams and other clients meanwhile,
and bounds each job's time: a job still running after ``timeout`` seconds is
interrupted, by raising :class:`Interrupted` in its thread
(``PyThreadState_SetAsyncExc``, the mechanism CPython offers for this). The
exception arrives at the job's next Python bytecode: at once in a Jinja
template (pure Python), after the current call in a tokenizer's native code
(which the request's size limits keep short). The caller gets
:class:`PrepareTimeout` at the deadline, whether or not the thread has
stopped yet; a worker counts as free again only once its thread has.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Interrupted(BaseException):
    """Raised inside a job that ran past its deadline (a BaseException: ``except Exception`` in the job's
    code, e.g. around a chat template, does not swallow it)."""


class PrepareTimeout(Exception):
    """A job did not finish within the Offloader's timeout (it has been interrupted)."""


class WorkersBusy(Exception):
    """No worker was free within the Offloader's timeout (the job never started)."""


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the loop has closed (a worker finished after the server stopped)
        pass


def _raise_in_thread(thread_id: int, exception: type[BaseException] | None) -> None:
    """Schedules ``exception`` in the thread (None: clears one scheduled and not yet raised)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exception) if exception is not None else None)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class _Job:
    __slots__ = ("thread", "interrupted")

    def __init__(self):
        self.thread: int | None = None  # the running thread's id, while the job runs
        self.interrupted = False


class Offloader:
    """Runs functions on ``workers`` threads, each call at most ``timeout`` seconds (see the module docstring).

    Args:
      workers: threads; calls beyond wait (on the event loop, without a thread) for a free one.
      timeout: seconds a call may run once it has a thread.
    """

    def __init__(self, workers: int, timeout: float):
        self.timeout = timeout
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="eagle3-jax-prepare")
        self._slots: asyncio.Semaphore | None = None
        self._workers = workers
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker thread; raises :class:`PrepareTimeout` after ``timeout`` seconds of it,
        :class:`WorkersBusy` when no worker has been free for ``timeout`` seconds, or what ``fn`` raised.
        Cancelling the caller interrupts the job too."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._workers)
        loop = asyncio.get_running_loop()
        try:  # workers stuck in native code that never returns must not hold every later request for ever
            await asyncio.wait_for(self._slots.acquire(), self.timeout)
        except TimeoutError:
            raise WorkersBusy(f"no worker was free for {self.timeout:g} s") from None
        job = _Job()
        try:
            future = self._executor.submit(self._call, job, fn, args)
        except BaseException:
            self._slots.release()
            raise
        # The slot comes back when the thread is done with the job, not at the caller's deadline.
        future.add_done_callback(lambda _: _call_soon(loop, self._slots.release))
        result = asyncio.wrap_future(future)
        result.add_done_callback(_retrieve)  # an interrupted job's exception is nobody's to see
        try:
            return await asyncio.wait_for(asyncio.shield(result), self.timeout)
        except TimeoutError:
            self._interrupt(job, future)
            raise PrepareTimeout(f"it ran for more than {self.timeout:g} s") from None
        except asyncio.CancelledError:
            self._interrupt(job, future)
            raise

    def _call(self, job: _Job, fn: Callable[..., T], args: tuple) -> T:
        with self._lock:
            if job.interrupted:  # its deadline passed as it started
                raise Interrupted
            job.thread = threading.get_ident()
        try:
            return fn(*args)
        finally:
            with self._lock:
                job.thread = None
                _raise_in_thread(threading.get_ident(), None)  # an interruption that came too late: dropped

    def _interrupt(self, job: _Job, future: concurrent.futures.Future) -> None:
        if future.cancel():  # not started yet: it never will
            return
        with self._lock:
            if job.interrupted:
                return
            job.interrupted = True
            if job.thread is not None:
                _raise_in_thread(job.thread, Interrupted)

    def shutdown(self) -> None:
        """Stops the threads once their jobs end (new calls are refused)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["Interrupted", "Offloader", "PrepareTimeout", "WorkersBusy"]
