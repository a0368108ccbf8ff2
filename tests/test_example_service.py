"""examples/service.py (your own pipeline and Guard behind gie_guard.serving) under a real
uvicorn on 127.0.0.1: ready, generate, scrape, stop."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gie_guard.serving.schemas import concept_label

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "service.py"


def call(url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_example_service_serves(monkeypatch, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: example\nconcepts: [{id: circle, text: circle, scale: 1.5}]\n")
    monkeypatch.setenv("EXAMPLE_MODEL", "tiny")
    monkeypatch.setenv("EXAMPLE_POLICY", str(policy))
    spec = importlib.util.spec_from_file_location("example_service", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "example_service", module)
    spec.loader.exec_module(module)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(module.app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while call(f"{base}/readyz")[0] != 200:
            assert time.monotonic() < deadline, call(f"{base}/readyz")
            time.sleep(0.1)
        status, body = call(f"{base}/v1/images", {"prompt": "a red circle", "seed": 1, "steps": 2, "n": 2})
        assert status == 200, body
        report = json.loads(body)["report"]
        assert report["policy"] == "example" and report["concepts"] == [{"id": concept_label("example", "circle"), "inhibited": True}]
        assert module.service.guard.store.watching  # a policy file is watched
        status, body = call(f"{base}/metrics")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        assert samples[("gie_guard_serve_images_total", ())] == 2
        assert samples[("gie_guard_generations_total", (("outcome", "ok"), ("policy", "example")))] == 1
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert module.service.state == "stopping" and not module.service.guard.store.watching
