"""The HTTP server under the app: uvicorn, with the two guards it lacks.

- **Slow clients.** uvicorn times out idle keep-alive connections, but not a
  client that trickles its request line and headers, or the rest of a body
  whose response was already sent: such a client holds its connection (and a
  file descriptor) for as long as it likes. :func:`guarded_protocol` makes
  uvicorn's h11 protocol close a connection that has been waiting for its
  client longer than ``header_timeout`` seconds, whenever no response is in
  progress on it. (A body refused before it was read, e.g. with 413, is
  still received and dropped until then, so that a client still sending
  reads the answer instead of a connection reset.) Bodies the app reads have their own deadline
  (``serve/limits.py``). The number of connections is bounded by uvicorn's
  ``limit_concurrency`` (503 beyond).
- **Requests in flight at shutdown.** uvicorn waits for them a few seconds,
  then cancels them, which answers a non-streamed client with a plain-text
  500 and logs a traceback per request. :class:`GracefulServer` first ends
  them itself (``Server.begin_shutdown``: a 503 in OpenAI's error format,
  said once in the log), then lets uvicorn finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose client keeps the server waiting more than
    ``header_timeout`` seconds (for a request's line and headers, or for the rest of a body that nobody
    reads any more)."""

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _served = False  # a response has been sent on this connection (idle after it: keep-alive)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch()  # a new connection must send its request's headers in time

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            self._served = True
            super().on_response_complete()
            # An idle keep-alive connection is uvicorn's to close (timeout_keep_alive); a request whose body
            # still trickles in after its response is ours.
            self._watch()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _waiting_for_client(self) -> bool:
            """A new connection without its request yet, headers begun but not complete, or a response sent
            while its request's body still arrives."""
            if self.transport is None or self.transport.is_closing():
                return False
            if self.conn.their_state is h11.IDLE:
                return not self._served or bool(self.conn.trailing_data[0])
            responded = self.cycle is None or self.cycle.response_complete
            return responded and self.conn.their_state is h11.SEND_BODY

        def _watch(self) -> None:
            if self._waiting_for_client():
                if self._deadline is None:
                    self._deadline = self.loop.call_later(header_timeout, self._expired)
            else:
                self._disarm()

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self._waiting_for_client():
                self.transport.close()

    return GuardedH11Protocol


class GracefulServer(uvicorn.Server):
    """A uvicorn server that calls ``before_shutdown()`` (once no new connection is accepted) before its
    graceful shutdown waits for the requests in flight; a second Ctrl-C (uvicorn's ``force_exit``) stops
    waiting for it."""

    def __init__(self, config: uvicorn.Config, before_shutdown: Callable[[], Awaitable[None]]):
        super().__init__(config)
        self._before_shutdown = before_shutdown

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:  # no new connections while the requests in flight are ended
            server.close()
        try:
            ending = asyncio.ensure_future(self._before_shutdown())
            while not ending.done() and not self.force_exit:  # a second Ctrl-C stops waiting for it
                await asyncio.wait({ending}, timeout=0.1)
            if ending.done():
                ending.result()
        finally:
            await super().shutdown(sockets)


__all__ = ["GracefulServer", "guarded_protocol"]
