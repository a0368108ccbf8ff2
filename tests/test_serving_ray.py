"""Ray Serve, for real: a local cluster (2 CPUs), 2 replicas of the guarded image service,
bounded concurrent requests, the policy file swapped by rename halfway: nothing lost or
failed, every report names one complete policy, every replica serves the new policy after
the swap, and the counters summed over the replicas equal the requests made. This is the
small version of benchmarks/serve_load.py (tiny model), whose results.json it checks."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

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
                                   timeout_s=120, max_seconds=240, unguarded=False, max_batch_images=4)
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
