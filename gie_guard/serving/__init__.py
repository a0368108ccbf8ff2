"""Serving guarded generations: metrics over HTTP, and (extra ``serve``) an image service.

Always available (prometheus_client only):

- :func:`start_metrics_server`, :class:`MetricsServer`: ``/metrics`` on a thread of its own;
- :func:`exposition`, :func:`scrape_registry`: the exposition for a server you already run;
- :func:`mark_process_dead`, :func:`reap_dead_processes`: multi-process bookkeeping.

With ``pip install 'gie-guard[serve]'`` (FastAPI, uvicorn; Ray Serve for replicas):

- :class:`ImageService`: one pipeline, one Guard, request admission and batching;
- :func:`create_app`: the FastAPI app (``POST /v1/images``, ``/metrics``, ``/healthz``, ``/readyz``);
- :class:`ServiceSpec`, :class:`ServeSettings`, :class:`ImageRequest`: settings and schemas;
- :mod:`gie_guard.serving.ray`: the same app as a Ray Serve deployment.

docs/deployment.md covers one machine (uvicorn workers) and many (Ray Serve).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .exposition import (
    MULTIPROC_ENV,
    MetricsServer,
    exposition,
    mark_process_dead,
    multiprocess_dir,
    reap_dead_processes,
    scrape_registry,
    start_metrics_server,
)

if TYPE_CHECKING:
    from .app import create_app
    from .schemas import ImageRequest, ServeSettings
    from .service import ImageService, ServiceSpec

_LAZY = {
    "create_app": ".app",
    "ImageRequest": ".schemas",
    "ServeSettings": ".schemas",
    "ImageService": ".service",
    "ServiceSpec": ".service",
}

__all__ = [
    # always available (prometheus_client only)
    "MULTIPROC_ENV", "MetricsServer", "exposition", "mark_process_dead", "multiprocess_dir", "reap_dead_processes",
    "scrape_registry", "start_metrics_server",
    # with the serve extra
    "ImageRequest", "ImageService", "ServeSettings", "ServiceSpec", "create_app",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module == ".app":
        try:
            importlib.import_module("fastapi")
        except ImportError as exc:
            from ..errors import MissingDependencyError

            raise MissingDependencyError("fastapi", "serve", needed_for="gie_guard.serving.create_app") from exc
    return getattr(importlib.import_module(module, __name__), name)
