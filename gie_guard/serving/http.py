"""The HTTP server around the app: uvicorn, with a header timeout and a request limit that
idle connections cannot exhaust.

uvicorn (0.55) has no timeout for a request's headers: a connection that opens and sends
nothing, or sends half a request line, stays open until the client goes away
(``timeout_keep_alive`` only starts after a response). And its ``limit_concurrency`` counts
open *connections* as well as requests in progress, so 256 such idle sockets made every
request, ``/readyz`` included, a 503. Both are fixed here, in the protocol, where they start:

- ``header_timeout_s``: from the moment a connection opens, and again from the moment an
  answer on it is complete, the next request's headers must have arrived within this many
  seconds, or the connection is closed (nothing is answered: there is no request to answer).
  A request whose headers arrived is not touched (its body has ``body_timeout_s``).
- ``max_requests``: requests in progress across the process (not connections) before the
  server answers the service's JSON 503 with ``Retry-After``. ``/healthz`` and ``/readyz``
  are never refused by it, so an overloaded process is not also reported dead or unready.
- with h11 (the default here) a request head is bounded in size too
  (``h11_max_incomplete_event_size``, 16 KiB: a larger one gets 400).

Use :func:`server_config` in place of ``uvicorn.Config`` (``gie-guard serve`` does)::

    config = server_config(app, header_timeout_s=10, max_requests=256, host="127.0.0.1", port=8000)
    uvicorn.Server(config).run()

Idle connections still hold a file descriptor each until their header timeout: raise the
process's limit (``ulimit -n``) above the connections you expect in ``header_timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["DEFAULT_HEADER_TIMEOUT_S", "GuardedConfig", "GuardedH11Protocol", "server_config"]

log = logging.getLogger("gie_guard.serving")

DEFAULT_HEADER_TIMEOUT_S = 10.0
PROBE_PATHS = frozenset({"/healthz", "/readyz"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

_BUSY = json.dumps({"error": {"code": "overloaded", "message": "too many requests in progress; retry later",
                              "fields": []}}, separators=(",", ":")).encode("ascii")


class GuardedConfig(uvicorn.Config):
    """``uvicorn.Config`` with ``header_timeout_s`` and ``max_requests`` (see the module);
    uvicorn's own ``limit_concurrency`` stays off (it counts idle connections)."""

    def __init__(self, app: Any, *, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                 max_requests: int | None = None, **kwargs: Any) -> None:
        if not header_timeout_s > 0:
            raise ValueError(f"header_timeout_s must be above 0, got {header_timeout_s}")
        if max_requests is not None and max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {max_requests}")
        if kwargs.get("limit_concurrency") is not None:
            raise ValueError("use max_requests: uvicorn's limit_concurrency counts idle connections too")
        kwargs.setdefault("http", GuardedH11Protocol)
        super().__init__(app, **kwargs)
        self.header_timeout_s = float(header_timeout_s)
        self.max_requests = max_requests


def server_config(app: Any, *, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, max_requests: int | None = None,
                  **kwargs: Any) -> GuardedConfig:
    """A :class:`GuardedConfig` (``kwargs`` are ``uvicorn.Config``'s)."""
    return GuardedConfig(app, header_timeout_s=header_timeout_s, max_requests=max_requests, **kwargs)


class _HeaderDeadline:
    """Mixed in before a uvicorn HTTP protocol class (h11 or httptools): the header timeout
    and the request limit. It relies on what both of uvicorn's protocols do: ``self.cycle``
    is a new object as soon as a request's headers are complete, and ``on_response_complete``
    runs when an answer has been sent."""

    # set by the protocol classes' __init__ (uvicorn's attributes, typed here for mypy)
    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    app: ASGIApp
    tasks: set[asyncio.Task[None]]

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        self.header_timeout_s = float(getattr(config, "header_timeout_s", DEFAULT_HEADER_TIMEOUT_S))
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaited: Any = None
        max_requests = getattr(config, "max_requests", None)
        if max_requests is not None:
            self.app = _limited(self.app, self.tasks, int(max_requests))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        # armed before the base class runs: it may start a pipelined request, whose new
        # cycle then tells the timer that headers did arrive
        if not self.transport.is_closing():
            self._await_headers()
        super().on_response_complete()  # type: ignore[misc]

    def _await_headers(self) -> None:
        self._cancel_header_timer()
        self._awaited = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.cycle is not self._awaited:  # a request's headers arrived in time
            return
        if not self.transport.is_closing():
            log.debug("closing a connection that sent no complete request headers within %gs", self.header_timeout_s)
            self.transport.close()


class GuardedH11Protocol(_HeaderDeadline, H11Protocol):
    """uvicorn's h11 protocol with the header timeout and the request limit."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional
    pass
else:
    class GuardedHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
        """uvicorn's httptools protocol with the header timeout and the request limit (no
        head size limit of its own: prefer h11 facing clients you do not trust)."""

    __all__ += ["GuardedHttpToolsProtocol"]


def _limited(app: ASGIApp, tasks: set[asyncio.Task[None]], limit: int) -> ASGIApp:
    """``app``, answering 503 when more than ``limit`` requests are in progress in this
    process (``tasks`` holds the request being started), except on the probe paths."""

    async def limited(scope: Scope, receive: Callable[[], Awaitable[Message]],
                      send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "http" and len(tasks) > limit and scope.get("path") not in PROBE_PATHS:
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(_BUSY)).encode()),
                (b"retry-after", b"1"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": _BUSY})
            return
        await app(scope, receive, send)

    return limited
