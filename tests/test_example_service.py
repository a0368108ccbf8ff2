"""examples/service.py started for real on loopback, used over HTTP, scraped, and stopped."""

import base64
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

SERVICE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "service.py"


def request(url, body=None, *, content_type="application/json", method=None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


@pytest.fixture(scope="module")
def service():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, str(SERVICE), "--port", "0", "--pipeline", "tiny", "--max-steps", "4", "--max-body", "2048"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), (line, proc.poll())
        yield line.split()[-1], proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_service_generates_and_serves_metrics(service):
    base, proc = service
    status, _, body = request(f"{base}/healthz")
    assert status == 200 and json.loads(body)["policy"] == "shapes-demo"

    prompt = "a quokka-coloured circle"
    for seed in (1, 2):
        status, headers, body = request(f"{base}/generate", {"prompt": prompt, "seed": seed, "steps": 2})
        assert status == 200, body
        answer = json.loads(body)
        image = Image.open(io.BytesIO(base64.b64decode(answer["image_png_base64"])))
        assert image.format == "PNG" and image.size == (8, 8)
        assert answer["report"]["policy_name"] == "shapes-demo" and answer["report"]["total_steps"] == 2

    # clear 4xx answers, none of which counts as a generation
    cases = [
        (request(f"{base}/generate", b"{not json"), 400, "not JSON"),
        (request(f"{base}/generate", {"prompt": "x", "steps": 99}), 400, "steps"),
        (request(f"{base}/generate", {"prompt": "x", "colour": "red"}), 400, "unknown fields: colour"),
        (request(f"{base}/generate", {"prompt": "x" * 4000}), 413, "over 2048 bytes"),
        (request(f"{base}/generate", b"prompt=x", content_type="text/plain"), 415, "Content-Type"),
        (request(f"{base}/nowhere"), 404, "no such path"),
        (request(f"{base}/generate"), 405, "POST"),
    ]
    for (status, _, body), expected, message in cases:
        assert status == expected and message in json.loads(body)["error"], (status, body)

    status, headers, body = request(f"{base}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    generations = lambda outcome: samples[("gie_guard_generations_total", (("outcome", outcome), ("policy", "shapes-demo")))]
    assert generations("ok") == 2 and generations("error") == 0 and generations("blocked") == 0
    assert samples[("gie_guard_concept_scale_count", (("concept", "circle"), ("policy", "shapes-demo")))] == 2
    assert samples[("gie_guard_policy_info", (("content_hash", json.loads(request(f"{base}/healthz")[2])["content_hash"]),
                                              ("policy", "shapes-demo"), ("version", "1")))] == 1
    assert "quokka" not in body.decode()

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    logs = proc.stderr.read()
    assert "POST /generate 200" in logs and "quokka" not in logs  # INFO logs never carry the prompt
