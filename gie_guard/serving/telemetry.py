"""The serving layer's own metrics (``gie_guard_serve_*``), beside the guard's.

The guard counts guarded pipeline calls (``gie_guard_generations_total``); a server batches
several requests into one call, so it counts requests and images itself. All names and
labels are fixed; none carries request text. In multi-process mode
(``PROMETHEUS_MULTIPROC_DIR``) the gauges sum over live processes (``livesum``), so
``gie_guard_serve_ready`` is the number of ready workers or replicas.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["REQUEST_OUTCOMES", "ServeTelemetry"]

# outcome of one POST /v1/images:
#   ok, recorded, blurred, unknown  images returned (the verifier outcome of the guarded call)
#   blocked     451: a verifier blocked the request's images (policy action `block`)
#   invalid     400/413/415/422: the request was refused before generation
#   timeout     408: the body did not arrive in time
#   overloaded  503: more requests than the service admits
#   not_ready   503: the pipeline is not loaded (yet), or the service is stopping
#   failed      500: the guarded call failed; nothing was returned (fail closed)
#   replica_lost  503 (Ray Serve): the replica holding the request died, and its one retry too
REQUEST_OUTCOMES = ("ok", "recorded", "blurred", "unknown", "blocked", "invalid", "timeout", "overloaded", "not_ready",
                    "failed", "replica_lost")

_COUNT_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeTelemetry:
    """The ``gie_guard_serve_*`` metrics in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter("gie_guard_serve_requests_total", "Image requests answered, by outcome.",
                                ["outcome"], registry=r)
        self.retries = Counter("gie_guard_serve_retries_total",
                               "Requests sent again to a live replica after the one holding them died (Ray Serve).",
                               registry=r)
        self.images = Counter("gie_guard_serve_images_total", "Images returned to clients.", registry=r)
        self.batch_requests = Histogram("gie_guard_serve_batch_requests", "Requests per guarded pipeline call.",
                                        buckets=_COUNT_BUCKETS, registry=r)
        self.batch_images = Histogram("gie_guard_serve_batch_images", "Images per guarded pipeline call.",
                                      buckets=_COUNT_BUCKETS, registry=r)
        self.queue_seconds = Histogram("gie_guard_serve_queue_seconds",
                                       "Seconds an admitted request waited before its guarded call started.",
                                       buckets=_SECONDS_BUCKETS, registry=r)
        self.request_seconds = Histogram("gie_guard_serve_request_duration_seconds",
                                         "Seconds from admission to the answer, for requests that reached the pipeline.",
                                         buckets=_SECONDS_BUCKETS, registry=r)
        self.in_flight = Gauge("gie_guard_serve_requests_in_flight", "Admitted requests (queued or generating).",
                               registry=r, multiprocess_mode="livesum")
        self.ready = Gauge("gie_guard_serve_ready",
                           "1 per serving process whose pipeline is loaded and policy compiled.",
                           registry=r, multiprocess_mode="livesum")
        for outcome in REQUEST_OUTCOMES:
            self.requests.labels(outcome)
        self.ready.set(0)
        self.in_flight.set(0)

    def count(self, outcome: str, images: int = 0) -> None:
        if outcome not in REQUEST_OUTCOMES:
            raise ValueError(f"unknown request outcome {outcome!r}")
        self.requests.labels(outcome).inc()
        if images:
            self.images.inc(images)
