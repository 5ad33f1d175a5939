"""The HTTP side of the server under uvicorn: connection limits and timeouts, and the drain on
SIGTERM (the command line is qoq_jax/serve.py; tests build the same server in a thread).

- `Timeouts`: `header` (a request's line and headers must arrive within this many seconds of
  the connection opening or of the previous response: idle and slow-header connections are
  closed; uvicorn has no such timer), `keep_alive` (uvicorn's idle time between requests) and
  `body` (a request body must arrive within this many seconds of its headers: 408; read by
  the app, qoq_jax/server/app.py).
- `DrainingServer`: the first SIGTERM (or SIGINT) starts a drain: the listening socket stays
  open and every new generation request is answered 503 (/health: 503 "draining"), so that
  clients and load balancers see a clear answer rather than "connection refused"; the
  running requests go on. The drain ends when none is left, or after `drain_timeout`
  seconds, whichever is first; then uvicorn closes the socket, cancels what still runs (its
  slots and pages are freed) and the process exits with 0 (SIGINT: as Ctrl-C does). A second
  signal ends the drain at once.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("qoq_jax.serve")


@dataclasses.dataclass(frozen=True)
class Timeouts:
    header: float = 10.0
    keep_alive: float = 5.0
    body: float = 30.0
    drain: float = 30.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not v > 0:
                raise ValueError(f"the {f.name} timeout must be > 0 seconds, got {v}")


def protocol_class(header_timeout: float):
    """uvicorn's h11 protocol with a header timer: armed when a connection opens and when a
    response ends, cancelled once a request's headers have arrived; when it fires with no
    request in progress, the connection is closed."""

    class Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc):
            self._cancel_header_timer()
            super().connection_lost(exc)

        def handle_events(self):
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are in
                self._cancel_header_timer()

        def on_response_complete(self):
            self._arm_header_timer()  # before: a pipelined request cancels it
            super().on_response_complete()

        def _arm_header_timer(self):
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _cancel_header_timer(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self):
            self._header_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being served
            if not self.transport.is_closing():
                try:
                    self.conn.send(h11.ConnectionClosed())
                except h11.LocalProtocolError:
                    pass
                self.transport.close()

    return Protocol


def uvicorn_config(app, *, host: str = "127.0.0.1", port: int = 8000,
                   timeouts: Timeouts = Timeouts(), max_header_bytes: int = 16384,
                   max_connections: int | None = 1000, log_level: str = "info"):
    """The uvicorn.Config of the server: h11 with the header timer, no WebSockets, no Server
    header, at most `max_connections` connections and requests (then 503s)."""
    return uvicorn.Config(
        app, host=host, port=port, http=protocol_class(timeouts.header), ws="none",
        timeout_keep_alive=timeouts.keep_alive, h11_max_incomplete_event_size=max_header_bytes,
        limit_concurrency=max_connections, server_header=False, log_level=log_level,
        # the drain has waited already: what still runs after it is cancelled soon
        timeout_graceful_shutdown=1)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server with the drain described above; `state` is the app's ServerState."""

    def __init__(self, config, state, drain_timeout: float = 30.0):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self.drain_started: float | None = None

    def handle_exit(self, sig, frame):
        """A signal (or a test) asks the server to stop: the first starts the drain, a second
        ends it now."""
        if self.drain_started is None and not self.should_exit:
            self.drain_started = time.monotonic()
            self.state.draining = True
            log.info("draining: new requests get 503; waiting up to %.0f s for %d running",
                     self.drain_timeout, max(0, self.state.in_flight))
            if sig == signal.SIGINT:
                self._captured_signals.append(sig)  # re-raised at the end, as Ctrl-C does
            return
        self.should_exit = True
        self.force_exit = self.force_exit or sig == signal.SIGINT

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self.drain_started
            if self.state.in_flight <= 0 or waited >= self.drain_timeout:
                if self.state.in_flight > 0:
                    log.warning("drain timeout (%.0f s): cancelling %d requests",
                                self.drain_timeout, self.state.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)
