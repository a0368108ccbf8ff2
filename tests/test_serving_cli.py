"""``gie-guard serve`` for real: two uvicorn workers on 127.0.0.1 serving the shapes model
with the nsfw policy, metrics summed over both workers, a SIGTERM that stops it cleanly;
and its configuration errors as one line each."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from gie_guard.cli import main  # noqa: E402
from gie_guard.serving.schemas import concept_label  # noqa: E402


def call(url, body=None, timeout=60):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_serve_with_two_workers_sums_metrics_and_stops_on_sigterm(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "stale.db").write_bytes(b"left by an earlier run")  # wiped at start
    proc = subprocess.Popen(
        [sys.executable, "-m", "gie_guard.cli", "serve", "--policy", "nsfw", "--model", "shapes", "--port", "0",
         "--workers", "2", "--torch-threads", "1", "--max-steps", "4", "--default-steps", "2",
         "--metrics-dir", str(metrics_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        base = line.split()[-1]
        assert not (metrics_dir / "stale.db").exists()
        deadline = time.monotonic() + 300
        while True:  # both workers load their own pipeline; /metrics counts the ready ones
            status, body = call(f"{base}/metrics")
            samples = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
                       if not s.labels} if status == 200 else {}
            if samples.get("gie_guard_serve_ready") == 2:
                break
            assert time.monotonic() < deadline and proc.poll() is None, "the workers did not get ready"
            time.sleep(0.5)
        status, body = call(f"{base}/readyz")
        assert status == 200 and json.loads(body)["policy"] == "nsfw"

        for seed in range(6):
            status, body = call(f"{base}/v1/images", {"prompt": "a wombat-shaped red circle", "seed": seed})
            assert status == 200, body
            answer = json.loads(body)
            assert Image.open(io.BytesIO(base64.b64decode(answer["images"][0]["b64_png"]))).size == (32, 32)
            ids = [c["id"] for c in answer["report"]["concepts"]]
            assert concept_label("nsfw", "nsfw-01") in ids and "nsfw-01" not in ids  # opaque labels by default
            assert all("text" not in c for c in answer["report"]["concepts"])
        assert call(f"{base}/v1/images", {"prompt": "x", "steps": 5})[0] == 422

        status, body = call(f"{base}/metrics")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        assert samples[("gie_guard_serve_requests_total", (("outcome", "ok"),))] == 6
        assert samples[("gie_guard_serve_requests_total", (("outcome", "invalid"),))] == 1
        assert samples[("gie_guard_generations_total", (("outcome", "ok"), ("policy", "nsfw")))] == 6
        assert samples[("gie_guard_serve_ready", ())] == 2
        assert len({name.rsplit("_", 1)[-1] for name in os.listdir(metrics_dir) if name.startswith("counter_")}) == 2
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    logs = proc.stderr.read()
    assert code == 0, logs[-2000:]
    assert "POST /v1/images 200" in logs and "Finished server process" in logs
    assert "wombat" not in logs  # INFO logs never carry the prompt


@pytest.mark.parametrize("argv, message", [
    (["serve", "--policy", "no-such-policy", "--model", "tiny"], "no-such-policy"),
    (["serve", "--model", "no-such-model"], "--pipeline 'no-such-model'"),
    (["serve", "--workers", "0"], "--workers must be at least 1"),
    (["serve", "--ray", "--workers", "2"], "with --ray use --replicas"),
    (["serve", "--max-queue", "0", "--model", "tiny", "--policy", "shapes-demo"], "invalid serve settings: max_queue"),
])
def test_serve_configuration_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
