"""The metrics endpoint: served from a thread, scraped for real, stopped."""

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from gie_guard.serving import exposition, start_metrics_server


def test_metrics_server_serves_the_given_registry_and_stops():
    registry = CollectorRegistry()
    Counter("gie_guard_test_events_total", "Events.", registry=registry).inc(3)
    server = start_metrics_server(0, registry=registry)
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=10) as response:
            body = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/plain")
        assert "gie_guard_test_events_total 3.0" in body
        assert "python_gc_objects_collected_total" not in body  # only the registry given
    finally:
        server.close()
    assert not server.thread.is_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)


def test_exposition_for_an_existing_server():
    registry = CollectorRegistry()
    Counter("gie_guard_test_events_total", "Events.", registry=registry).inc()
    body, content_type = exposition(registry)
    assert b"gie_guard_test_events_total 1.0" in body and content_type.startswith("text/plain")
    body, content_type = exposition(registry, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.rstrip().endswith(b"# EOF")
