"""Ray Serve, for real: a local cluster (2 CPUs), 2 replicas of the guarded image service,
bounded concurrent requests, the policy file swapped by rename halfway: nothing lost or
failed, every report names one complete policy, every replica serves the new policy after
the swap, and the counters summed over the replicas equal the requests made. This is the
small version of benchmarks/serve_load.py (tiny model), whose results.json it checks."""

from __future__ import annotations

import functools
import http.client
import importlib.util
import json
import os
import pathlib
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _serve_load():
    spec = importlib.util.spec_from_file_location("serve_load", REPO / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_two_replicas_policy_swap_under_load(tmp_path):
    serve_load = _serve_load()
    config = serve_load.LoadConfig(out=str(tmp_path), replicas=2, requests=24, concurrency=6, model="tiny", steps=2,
                                   timeout_s=300, max_seconds=900, unguarded=False, max_batch_images=4)
    # (bounds against a hang, generous for a busy machine: the test checks behaviour, not speed;
    # Ray's proxy health checks are patient too, gie_guard.serving.ray.RAY_ENV_DEFAULTS)
    results = serve_load.run(config)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert "| replicas |" in (tmp_path / "results.md").read_text()

    # no request lost or failed
    assert (results["requests"], results["ok"], results["errors"], results["lost"], results["not_sent"]) == (24, 24, 0, 0, 0)
    assert results["probe_ok"] == results["probe_requests"] > 0, results["error_samples"]
    # every response's report names one complete policy (its hash and exactly its concepts)
    before, after = results["policy_hashes"]["before"], results["policy_hashes"]["after"]
    assert results["incomplete_reports"] == []
    assert results["policies_seen"][0] == before and set(results["policies_seen"]) <= {before, after}
    # after the swap every replica serves the new policy
    replicas = results["after_swap"]["replicas"]
    assert len(replicas) == 2 and results["after_swap"]["all_new"], replicas
    metrics = results["metrics"]
    assert metrics["policy_info"] == {before: 0.0, after: 1.0}
    assert metrics["reloads"] == {"success": 2.0}  # one swap per replica
    # the counters summed over both replicas equal the requests made
    made = results["requests"] + results["probe_requests"]
    assert metrics["serve_requests_total"] == {"ok": made} and metrics["serve_images_total"] == made
    assert metrics["generations_total"] == metrics["generations_ok"] == metrics["guarded_calls_from_responses"]
    assert metrics["serve_ready"] == 2
    assert results["p50_s"] is not None and results["throughput_rps"] > 0


def _slow_service(marks: str, spec):
    """The spec's service, each guarded call 1 s longer, its process id written to ``marks``
    when it starts a call (runs in the replicas: this module travels by value)."""
    from gie_guard.serving.service import ImageService

    class Slow(ImageService):
        def _call_pipeline(self, kwargs):
            pathlib.Path(marks, str(os.getpid())).touch()
            time.sleep(1.0)
            return super()._call_pipeline(kwargs)

    built = spec.build()
    return Slow(built._pipeline_factory, built._guard_factory, spec.settings, description="slow")


def _post(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/images", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_a_replica_killed_mid_request_loses_nothing(tmp_path):
    """Ray on 127.0.0.1, 2 replicas; one replica's process is killed (SIGKILL) while it holds
    requests: each request is answered 200 (retried once on the live replica, with its seed)
    or the service's JSON 503 with Retry-After, never Serve's plain 500, and the service's
    counters add up to the requests made."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families
    from ray import serve

    from gie_guard.serving import ServeSettings, ServiceSpec
    from gie_guard.serving.ray import build_app, start_local_ray

    marks = tmp_path / "marks"
    marks.mkdir()
    settings = ServeSettings(max_steps=4, default_steps=2, max_batch_images=1, batch_wait_s=0.0, torch_threads=1)
    spec = ServiceSpec(model="tiny", policy="shapes-demo", watch=False, device="cpu", settings=settings)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert start_local_ray(num_cpus=2, log_to_driver=False, object_store_memory=128 * 2**20) == "127.0.0.1"
    try:
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(spec, replicas=2, metrics_dir=str(tmp_path / "metrics"),
                            service_factory=functools.partial(_slow_service, str(marks))),
                  name="gie-guard", route_prefix="/")
        bodies = [{"prompt": f"a red circle {i}", **({"seed": 100 + i} if i % 2 else {})} for i in range(8)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(_post, port, body) for body in bodies]
            deadline = time.monotonic() + 300
            while not any(marks.iterdir()):  # until a replica is generating
                assert time.monotonic() < deadline, "no replica started generating"
                assert not all(f.done() for f in futures), [f.result() for f in futures][:2]  # answered already?
                time.sleep(0.05)
            victim = int(next(marks.iterdir()).name)
            os.kill(victim, signal.SIGKILL)
            answers = [f.result() for f in futures]
        outcomes = []
        for body, (status, headers, raw) in zip(bodies, answers):
            answer = json.loads(raw)  # JSON, whatever happened
            if status == 200:
                if "seed" in body:
                    assert answer["images"][0]["seed"] == body["seed"]
                outcomes.append("ok")
            else:
                assert status == 503 and answer["error"]["code"] == "replica_lost", (status, raw[:300])
                assert headers.get("retry-after") == "5"
                outcomes.append("replica_lost")
        assert outcomes.count("ok") >= 1

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        counted = {s.labels["outcome"]: s.value for s in samples if s.name == "gie_guard_serve_requests_total" and s.value}
        retries = sum(s.value for s in samples if s.name == "gie_guard_serve_retries_total")
        # every request is counted once, by the replica that answered it or by the ingress
        assert counted == {k: float(outcomes.count(k)) for k in set(outcomes)}, (counted, outcomes)
        assert retries >= 1  # the killed replica held at least the request it was generating
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_ingress_seeds_a_request_only_where_that_is_safe():
    from gie_guard.serving.ray import _with_seed

    seeded = json.loads(_with_seed('{"prompt": "é", "seed": null}'.encode(), 65536))
    assert seeded["prompt"] == "é" and isinstance(seeded["seed"], int)
    for body in (b'{"prompt": "x", "seed": 5}', b"[1]", b"{not json", b'{"prompt": "\\ud800"}'):
        assert _with_seed(body, 65536) == body  # the replica answers these as they are
    long = b'{"prompt": "' + b"x" * 100 + b'"}'
    assert _with_seed(long, len(long) + 5) == long  # the seed would take it past max_body_bytes
