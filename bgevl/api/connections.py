"""What one connection may hold of the server: uvicorn's HTTP/1.1 protocol with a deadline for a request's
head and a bound on open connections.

uvicorn has an idle timeout between requests (``timeout_keep_alive``, which any byte received resets) and
checks ``limit_concurrency`` only once a request's head is complete. A client sending a header byte a second
therefore held its connection for ever, and 1,100 of them exhausted a 1,024-descriptor limit: healthy clients
timed out while the server wrote a traceback per refused ``accept`` (65.8 MB in 14 s, measured). Here:

* a request's head (request line and headers) must be complete within ``header_timeout_s`` of the
  connection, or of the previous response on a kept-alive one; else the connection is closed;
* at most ``max_connections`` connections are open (default: the process's descriptor limit less a margin
  for the model's files and the server's own); one more is closed as soon as it is accepted;
* each condition is logged once a minute with how often it happened, not once per connection.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("bgevl.api")

#: descriptors kept free for everything but client connections (model files, sockets to Triton, logs)
DESCRIPTOR_MARGIN = 128


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft if soft != resource.RLIM_INFINITY else 65536) - DESCRIPTOR_MARGIN)


class _Condition:
    """A condition logged at most once a minute, with its count since the last line."""

    def __init__(self, message: str):
        self.message, self.count, self.last = message, 0, float("-inf")

    def happened(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= 60:
            log.warning("bgevl-api: %s (%d time(s) since the last such line)", self.message, self.count)
            self.count, self.last = 0, now


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's H11Protocol with the two bounds above (a class, for ``uvicorn.Config(http=...)``)."""
    slow = _Condition(f"closed a connection whose request head was not complete within {header_timeout_s:g} s")
    over = _Condition(f"closed a connection over the limit of {max_connections} open connections")

    class GuardedH11Protocol(H11Protocol):
        _deadline: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                over.happened()
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                slow.happened()
                self.transport.close()

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a complete request head: its deadline is met
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the next request's head on this kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
