"""Expose the guard's metrics over HTTP (``gie_guard.serving``; no web framework needed).

Two ways:

- :func:`start_metrics_server` runs prometheus_client's own HTTP server on a daemon thread
  (``/metrics``) and returns a :class:`MetricsServer` you can stop;
- :func:`exposition` returns ``(body, content_type)`` for an HTTP server you already run
  (the FastAPI app in :mod:`gie_guard.serving.app` uses it).

Both handle multi-process servers (gunicorn and the like): when the environment variable
``PROMETHEUS_MULTIPROC_DIR`` is set and no registry is given, they collect every worker's
values from that directory with ``prometheus_client.multiprocess.MultiProcessCollector``.
See docs/observability.md for the full multi-process setup, and docs/deployment.md for
uvicorn workers and Ray Serve replicas. :func:`reap_dead_processes` does what gunicorn's
``child_exit`` hook does for supervisors that have no such hook (uvicorn's, Ray's).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder

__all__ = [
    "MULTIPROC_ENV",
    "MetricsServer",
    "exposition",
    "mark_process_dead",
    "multiprocess_dir",
    "reap_dead_processes",
    "scrape_registry",
    "start_metrics_server",
]

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
        multiprocess.MultiProcessCollector(collecting)  # type: ignore[no-untyped-call]  # unannotated upstream
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


def multiprocess_dir() -> str | None:
    """The multi-process metrics directory (``PROMETHEUS_MULTIPROC_DIR``), or None."""
    return os.environ.get(MULTIPROC_ENV) or None


_LIVE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


def reap_dead_processes(path: str | None = None) -> list[int]:
    """Multi-process mode: call :func:`mark_process_dead` for every process that left live
    gauge files in ``path`` (default: ``PROMETHEUS_MULTIPROC_DIR``) and no longer runs, so
    its ``live*`` gauges stop counting. For supervisors without a ``child_exit`` hook
    (uvicorn's ``--workers``, Ray Serve replicas on one node). Process ids are only
    meaningful on this machine (one directory per node or pod). Returns the pids reaped."""
    path = path or multiprocess_dir()
    if not path:
        return []
    try:
        names = os.listdir(path)
    except OSError:
        return []
    reaped = []
    for pid in sorted({int(m.group(1)) for m in map(_LIVE_FILE.fullmatch, names) if m}):
        if pid == os.getpid() or _alive(pid):
            continue
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]  # unannotated upstream
        reaped.append(pid)
    if reaped:
        log.info("metrics: removed the live gauges of %d ended process(es): %s", len(reaped), reaped)
    return reaped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def mark_process_dead(pid: int) -> None:
    """Tell multi-process metrics that worker ``pid`` is gone (gunicorn's ``child_exit``
    hook): its live gauges stop counting. A no-op outside multi-process mode."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]  # unannotated upstream


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
