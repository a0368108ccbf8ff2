"""examples/grafana-dashboard.json against what the service exports: every metric a panel's
PromQL names is on a real ``/metrics`` (uvicorn on 127.0.0.1, one request served), and every
``gie_guard_serve_*`` metric the service exports has a panel."""

from __future__ import annotations

import http.client
import json
import pathlib
import re
import socket
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from gie_guard import Guard  # noqa: E402
from gie_guard.serving import ImageService, ServeSettings, create_app  # noqa: E402
from gie_guard.serving.http import server_config  # noqa: E402

DASHBOARD = pathlib.Path(__file__).resolve().parents[1] / "examples" / "grafana-dashboard.json"
METRIC = re.compile(r"\bgie_guard_[a-z0-9_]+")
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                   "info": ("_info",), "summary": ("_sum", "_count", "")}


def _get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(path[0], path[1], body=path[2] if len(path) > 2 else None,
                     headers={"Content-Type": "application/json"} if len(path) > 2 else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def exported(sd_pipe):
    """Sample names of a real scrape: the guard's metrics and the service's, after one request."""
    service = ImageService(lambda: sd_pipe, lambda metrics: Guard(policy="shapes-demo", metrics=metrics),
                           ServeSettings(max_steps=2, default_steps=1))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(create_app(service), log_config=None, access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 180
        while _get(port, ("GET", "/readyz"))[0] != 200:
            assert time.monotonic() < deadline, "the service did not get ready"
            time.sleep(0.1)
        status, body = _get(port, ("POST", "/v1/images", json.dumps({"prompt": "a red circle", "seed": 1})))
        assert status == 200, body
        status, text = _get(port, ("GET", "/metrics"))
        assert status == 200
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    names = set()
    for family in text_string_to_metric_families(text.decode()):
        if family.name.endswith("_created"):  # prometheus_client's creation timestamps
            continue
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)))
    return names


def _expressions():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = list(dashboard["panels"])
    for panel in list(panels):
        panels.extend(panel.get("panels", []))  # rows
    out = [(panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])]
    out += [("variable " + v["name"], v["query"]["query"]) for v in dashboard["templating"]["list"]
            if isinstance(v.get("query"), dict)]
    return out


def test_every_panel_names_only_exported_metrics(exported):
    expressions = _expressions()
    assert len(expressions) >= 20
    missing = [(title, name) for title, expr in expressions for name in METRIC.findall(expr) if name not in exported]
    assert not missing, missing


def test_every_service_metric_has_a_panel(exported):
    named = {name for _, expr in _expressions() for name in METRIC.findall(expr)}
    families = {re.sub(r"(_total|_bucket|_sum|_count)$", "", n) for n in exported if n.startswith("gie_guard_serve_")}
    assert len(families) >= 9
    unshown = sorted(f for f in families if not any(n.startswith(f) for n in named))
    assert not unshown, unshown


def test_the_per_call_panels_say_so():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        exprs = " ".join(t["expr"] for t in panel.get("targets", []))
        if "gie_guard_concept_suppressions_total" in exprs or "gie_guard_generations_total" in exprs:
            assert "per guarded call" in panel["title"] and "not per request" in panel["description"], panel["title"]
