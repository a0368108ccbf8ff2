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


def test_reap_dead_processes_drops_the_live_gauges_of_ended_processes(tmp_path):
    """What gunicorn's child_exit hook does, for supervisors without one (uvicorn, Ray)."""
    import os
    import subprocess
    import sys

    from gie_guard.serving import reap_dead_processes

    script = ("from prometheus_client import Gauge; import os; "
              "Gauge('g', 'g', multiprocess_mode='livesum').set(1); print(os.getpid())")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    pid = int(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout)
    (tmp_path / f"gauge_livesum_{os.getpid()}.db").write_bytes(b"")  # this process runs: kept
    assert (tmp_path / f"gauge_livesum_{pid}.db").exists()
    assert reap_dead_processes(str(tmp_path)) == [pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"gauge_livesum_{os.getpid()}.db"]
    assert reap_dead_processes(str(tmp_path)) == []
    assert reap_dead_processes(str(tmp_path / "missing")) == []


def test_the_serve_config_in_the_docs_builds():
    """docs/deployment.md's Serve config file, through the application builder it names."""
    import importlib
    import pathlib
    import re

    import yaml

    pytest.importorskip("fastapi")
    pytest.importorskip("ray.serve")
    docs = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", docs, re.S) if "app_builder" in b)
    application = yaml.safe_load(block)["applications"][0]
    module, attr = application["import_path"].split(":")
    app = getattr(importlib.import_module(module), attr)(application["args"])
    ingress = app._bound_deployment  # Serve's Application keeps what it will deploy here
    assert ingress.name == "gie-guard-ingress" and ingress.ray_actor_options["num_cpus"] == 0
    assert "PROMETHEUS_MULTIPROC_DIR" in ingress.ray_actor_options["runtime_env"]["env_vars"]
    assert ingress.init_args[1]["max_batch_images"] == 8  # the settings, for the body limits
    deployment = ingress.init_args[0]._bound_deployment  # the replicas, behind the ingress
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert "PROMETHEUS_MULTIPROC_DIR" in deployment.ray_actor_options["runtime_env"]["env_vars"]
    spec = deployment.init_args[0]
    assert spec["model"] == "/models/sd15" and spec["settings"]["max_batch_images"] == 8
    assert deployment.max_ongoing_requests == 32
