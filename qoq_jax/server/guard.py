"""The ASGI middleware around every HTTP request (inside Starlette's outermost error middleware,
outside the routes' exception handlers):

- the Host check: a server without an API key answers only for the host names it is allowed
  (by default on loopback: localhost, 127.0.0.1, ::1), so that a web page cannot reach it
  through DNS rebinding;
- the count of requests in flight, /health and /metrics aside (the drain on SIGTERM waits
  for it to reach zero);
- /metrics' request counter, by route (a fixed set of labels) and status, for every answer,
  errors included;
- the last net: an exception nothing else handled is logged once (with its traceback) and
  answered with a JSON 500 that holds none of its text.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("qoq_jax.serve")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

# path -> the route label of /metrics; other paths: "other" (a bounded label set)
_ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat",
           "/v1/models": "models", "/health": "health", "/metrics": "metrics",
           "/docs": "docs", "/openapi.json": "docs", "/tokenize": "tokenize",
           "/detokenize": "tokenize", "/v1/responses": "responses"}


def route_label(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "models"
    return _ROUTES.get(path, "other")


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def host_name(host: str) -> str:
    """The name of a Host header's value, without its port and brackets, lower-case."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def host_allowed(host: str | None, allowed: tuple[str, ...] | None) -> bool:
    """allowed: None or containing "*": any; "*.example.com": that domain's subdomains."""
    if allowed is None or "*" in allowed:
        return True
    if not host:
        return False
    name = host_name(host)
    for a in allowed:
        a = host_name(a) if not a.startswith("*.") else a.lower()
        if name == a or (a.startswith("*.") and name.endswith(a[1:])):
            return True
    return False


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None):
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """The middleware (pure ASGI: streaming responses pass through untouched)."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        status = None
        route = route_label(scope.get("path", ""))
        counted = route not in ("health", "metrics")  # instant, and polled during a drain

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        state.in_flight += counted
        try:
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if not host_allowed(host, state.allowed_hosts):
                await send_json(send_status, 400, error_body(
                    "this server does not answer for the host named in the Host header (see "
                    "--allowed-hosts)", code="invalid_host"))
                return
            await self.app(scope, receive, send_status)
        except Exception:  # noqa: BLE001 - the last net: log once, answer without internals
            log.exception("unhandled error in %s %s", scope.get("method"),
                          scope.get("path", "")[:200])
            if status is None:  # otherwise the response has started: the connection ends
                await send_json(send_status, 500, error_body(
                    "internal server error (logged on the server)", "server_error"))
        finally:
            state.in_flight -= counted
            if status is not None:
                state.metrics.request(route, status)
