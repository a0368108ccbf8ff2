"""Expose the guard's metrics over HTTP.

Two ways:

- :func:`start_metrics_server` runs prometheus_client's own HTTP server on a daemon thread
  (``/metrics``) and returns a :class:`MetricsServer` you can stop;
- :func:`exposition` returns ``(body, content_type)`` for an HTTP server you already run
  (the example service in ``examples/service.py`` uses it).

Both handle multi-process servers (gunicorn and the like): when the environment variable
``PROMETHEUS_MULTIPROC_DIR`` is set and no registry is given, they collect every worker's
values from that directory with ``prometheus_client.multiprocess.MultiProcessCollector``.
See docs/observability.md for the full multi-process setup.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder

__all__ = ["MetricsServer", "exposition", "mark_process_dead", "scrape_registry", "start_metrics_server"]

log = logging.getLogger("gie_guard.serving")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def scrape_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """The registry to expose: ``registry`` if given; else, in multi-process mode, a fresh
    registry collecting all workers' files; else prometheus_client's default ``REGISTRY``."""
    if registry is not None:
        return registry
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        collecting = CollectorRegistry()
        multiprocess.MultiProcessCollector(collecting)
        return collecting
    return REGISTRY


def exposition(registry: CollectorRegistry | None = None, accept: str | None = None) -> tuple[bytes, str]:
    """The text exposition of ``registry`` (see :func:`scrape_registry`) and its content type;
    ``accept`` is the request's Accept header (OpenMetrics when the scraper asks for it)."""
    target = scrape_registry(registry)
    if accept:
        encoder, content_type = choose_encoder(accept)
        return encoder(target), content_type
    return generate_latest(target), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Tell multi-process metrics that worker ``pid`` is gone (gunicorn's ``child_exit``
    hook): its live gauges stop counting. A no-op outside multi-process mode."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)


@dataclass
class MetricsServer:
    """A running metrics endpoint. ``url`` is its ``/metrics`` address; :meth:`close` stops it."""

    server: Any
    thread: threading.Thread
    addr: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and wait for the server thread to end."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(port: int = 9464, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> MetricsServer:
    """Serve ``/metrics`` of ``registry`` (see :func:`scrape_registry`) on ``addr:port`` from a
    daemon thread. ``port=0`` picks a free port (read it from ``.port``). The default address
    is loopback: expose it wider (``addr="0.0.0.0"``) only on a trusted network."""
    server, thread = start_http_server(port, addr=addr, registry=scrape_registry(registry))
    bound = server.server_address[1]
    log.info("serving metrics on %s:%d/metrics", addr, bound)
    return MetricsServer(server=server, thread=thread, addr=addr, port=bound)
