"""Metrics: a live /metrics scrape after real guarded generations, checked against what happened."""

import logging
import re
import subprocess
import sys
import textwrap
import urllib.request

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gie_guard import ContentBlockedError, Guard, GuardMetrics, SuppressionRule, start_metrics_server
from gie_guard.metrics import concept_suppressed
from gie_guard.report import AppliedConcept, GuardReport
from gie_guard.verifiers import StaticVerifier

PROMPT = "a zebra-striped lighthouse on a beach at sunset"

POLICY = """\
version: "1"
name: coast
inhibit_steps: [0.0, 1.0]
dedup_threshold: 0.0
concepts:
  - {id: beach, text: beach, scale: 3.0, verify: {verifier: fake, action: blur}}
  - {id: sunset, text: sunset, scale: 0.5, verify: {verifier: fake, action: block}}
  - {id: city, text: city, scale: 0.0, verify: {verifier: fake, labels: [town], action: record}}
"""


def scrape(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}, text


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def test_live_scrape_counts_every_generation(sd_pipe, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "coast.yaml"
    path.write_text(POLICY)
    registry = CollectorRegistry()
    answers = []  # what the fake verifier says, one entry per call
    verifier = StaticVerifier(lambda i: answers[-1])
    guard = Guard(policy=str(path), registry=registry, verifiers={"fake": verifier})

    def generate(seed=0, **extra):
        call = dict(prompt=PROMPT, num_inference_steps=1, generator=torch.Generator().manual_seed(seed), output_type="np")
        return guard(sd_pipe, **call, **extra).images

    outcomes = {"ok": 0, "recorded": 0, "blurred": 0, "blocked": 0, "error": 0}
    reports = []
    for labels, outcome in [(set(), "ok"), (set(), "ok"), ({"town"}, "recorded"), ({"beach"}, "blurred")]:
        answers.append(labels)
        images = generate()
        outcomes[outcome] += 1
        reports.append(guard.last_report)
        if outcome == "ok":
            clean = images
        if outcome == "blurred":  # same seed as the clean image: the verifier's blur is all that differs
            assert images.shape == clean.shape and np.abs(images - clean).max() > 1e-3
            assert np.abs(np.diff(images, axis=1)).mean() < np.abs(np.diff(clean, axis=1)).mean()
    answers.append({"sunset", "beach"})
    with pytest.raises(ContentBlockedError, match="sunset") as blocked:
        generate()
    outcomes["blocked"] += 1
    reports.append(blocked.value.report)
    assert blocked.value.concept_ids == ("sunset",)

    def explode(pipe, step, timestep, callback_kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        generate(callback_on_step_end=explode)
    outcomes["error"] += 1

    # reloads: a broken file keeps the old policy, a changed one swaps, the same one is unchanged
    old_hash = guard.policy.content_hash
    path.write_text("concepts: [")
    assert guard.reload() is False
    broken = dict(scrape_registry(registry))
    path.write_text(POLICY.replace("name: coast", "name: coast\ndescription: v2"))
    assert guard.reload() is True
    assert guard.reload() is True
    new_hash = guard.policy.content_hash
    assert new_hash != old_hash

    with start_metrics_server(0, registry=registry) as server:
        samples, text = scrape(server.url)

    for outcome, n in outcomes.items():
        assert value(samples, "gie_guard_generations_total", policy="coast", outcome=outcome) == n, outcome
    produced = len(reports)  # generations that got as far as a report (all but the error)
    assert produced == 5
    rule = guard.metrics.rule
    for concept in ("beach", "sunset", "city"):
        applied = [(c, r) for r in reports for c in r.concepts if c.id == concept]
        suppressed = sum(concept_suppressed(c, r, rule) for c, r in applied)
        assert value(samples, "gie_guard_concept_suppressions_total", policy="coast", concept=concept) == suppressed
        assert value(samples, "gie_guard_concept_scale_count", policy="coast", concept=concept) == len(applied)
        assert value(samples, "gie_guard_verified_images_total", policy="coast", concept=concept) == produced
    # beach (scale 3, attention measured above the threshold) counts every time; sunset's
    # scale 0.5 is below min_scale; city's scale 0 is left out of the plan (never applied)
    assert value(samples, "gie_guard_concept_suppressions_total", policy="coast", concept="beach") == produced
    assert value(samples, "gie_guard_concept_suppressions_total", policy="coast", concept="sunset") == 0
    assert value(samples, "gie_guard_concept_applications_total", policy="coast", concept="sunset") == produced
    assert value(samples, "gie_guard_concept_applications_total", policy="coast", concept="city") == 0
    assert value(samples, "gie_guard_concept_scale_sum", policy="coast", concept="beach") == pytest.approx(3.0 * produced)
    assert value(samples, "gie_guard_concept_attention_ratio_count", policy="coast", concept="beach") == produced
    for action, concept, n in [("record", "city", 1), ("blur", "beach", 2), ("block", "sunset", 1)]:
        assert value(samples, "gie_guard_residual_detections_total", policy="coast", concept=concept, action=action) == n
    assert value(samples, "gie_guard_added_seconds_count", policy="coast") == produced
    assert value(samples, "gie_guard_added_seconds_sum", policy="coast") == pytest.approx(
        sum(r.added_seconds for r in reports))
    assert value(samples, "gie_guard_generation_duration_seconds_count", policy="coast") == produced

    # reloads and the active policy
    assert value(broken, "gie_guard_policy_last_reload_success", policy="coast") == 0
    assert value(samples, "gie_guard_policy_last_reload_success", policy="coast") == 1
    for result, n in [("failure", 1), ("success", 1), ("unchanged", 1)]:
        assert value(samples, "gie_guard_policy_reloads_total", policy="coast", result=result) == n
    assert value(samples, "gie_guard_policy_last_reload_success_timestamp_seconds", policy="coast") >= \
        value(broken, "gie_guard_policy_last_reload_success_timestamp_seconds", policy="coast")
    assert value(samples, "gie_guard_policy_info", policy="coast", version="1", content_hash=new_hash) == 1
    assert value(samples, "gie_guard_policy_info", policy="coast", version="1", content_hash=old_hash) == 0
    assert value(samples, "gie_guard_policy_concepts", policy="coast") == 3

    # no prompt text anywhere: not in the exposition, not in logs at INFO or above
    assert "zebra" not in text
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("residual" in m for m in loud)  # the verifier's hits are logged ...
    assert not any("zebra" in m for m in loud)  # ... without the prompt
    guard.close()


def scrape_registry(registry):
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


_UNIT_WORDS = re.compile(r"(milli|micro|nano|minutes|hours|bytes_kb|_ms$|percent)")
_LABELS = {"policy", "concept", "outcome", "result", "action", "version", "content_hash", "le"}


def test_metric_names_follow_the_prometheus_rules():
    registry = CollectorRegistry()
    guard = Guard(policy={"name": "p", "concepts": [
        {"id": "c1", "text": "circle", "scale": 2.0, "verify": {"verifier": "fake"}}]},
        registry=registry, verifiers={"fake": StaticVerifier()})
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    names = {f.name for f in families if not f.name.endswith("_created")}
    assert {"gie_guard_generations", "gie_guard_concept_suppressions", "gie_guard_concept_scale",
            "gie_guard_added_seconds", "gie_guard_policy_reloads", "gie_guard_policy_last_reload_success",
            "gie_guard_policy_last_reload_success_timestamp_seconds", "gie_guard_policy_info",
            "gie_guard_residual_detections"} <= names
    for family in families:
        if family.name.endswith("_created"):  # prometheus_client's own creation-time gauges
            continue
        assert re.fullmatch(r"gie_guard_[a-z0-9_]+", family.name), family.name
        assert not _UNIT_WORDS.search(family.name), f"{family.name}: use base units"
        for sample in family.samples:
            assert set(sample.labels) <= _LABELS, (family.name, sample.labels)
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
            else:
                assert not sample.name.endswith("_total"), sample.name
        if "seconds" in family.name and family.type in ("histogram", "gauge"):
            assert family.name.endswith("_seconds"), family.name
    # label children exist at zero for every concept of the active policy before any call
    samples = scrape_registry(registry)
    assert value(samples, "gie_guard_concept_suppressions_total", policy="p", concept="c1") == 0
    assert value(samples, "gie_guard_generations_total", policy="p", outcome="ok") == 0
    assert value(samples, "gie_guard_residual_detections_total", policy="p", concept="c1", action="block") == 0
    guard.close()


def test_guards_share_one_metrics_object_per_registry(monkeypatch):
    import gie_guard.metrics as metrics

    default = CollectorRegistry()  # stands in for the global registry, which tests never touch
    monkeypatch.setattr(metrics, "REGISTRY", default)
    first = Guard(policy={"name": "a", "concepts": []})
    second = Guard(policy={"name": "b", "concepts": []})
    third = Guard(policy={"name": "a", "concepts": []})  # same policy name: same series, no error
    assert first.metrics is second.metrics is third.metrics is GuardMetrics.for_registry(None)
    own = CollectorRegistry()
    assert Guard(policy={"name": "a", "concepts": []}, registry=own).metrics is not first.metrics
    samples = scrape_registry(default)
    assert value(samples, "gie_guard_policy_concepts", policy="a") == 0
    assert value(samples, "gie_guard_policy_concepts", policy="b") == 0
    with pytest.raises(ValueError, match="already uses"):
        GuardMetrics.for_registry(own, rule=SuppressionRule(min_scale=9.0))


def _report(scales, attention, inhibited=(0, 1)):
    concept = AppliedConcept("c", "c", (1,), tuple(scales), "policy", (attention,) if attention is not None else ())
    return concept, GuardReport("p", "h", "X", (concept,), tuple(inhibited), 2, (0.0, 1.0), True, 0.0, 0.0)


@pytest.mark.parametrize(
    ("scales", "attention", "inhibited", "expected"),
    [
        ((3.0,), 0.02, (0,), True),
        ((0.9,), 0.5, (0,), False),  # scale below min_scale 1.0
        ((3.0,), 0.005, (0,), False),  # attention below min_attention 0.01
        ((3.0,), 0.5, (), False),  # no step inhibited (window outside the call)
        ((3.0,), None, (0,), False),  # nothing measured
        ((0.5, 1.0), 0.01, (1,), True),  # the largest token scale counts; thresholds inclusive
    ],
)
def test_suppression_rule(scales, attention, inhibited, expected):
    concept, report = _report(scales, attention, inhibited)
    assert concept_suppressed(concept, report, SuppressionRule()) is expected


def test_multiprocess_workers_add_up(tmp_path):
    """Two forked workers write to PROMETHEUS_MULTIPROC_DIR; one collector sums them."""
    script = textwrap.dedent("""
        import multiprocessing, os, sys
        from prometheus_client import CollectorRegistry, generate_latest
        from gie_guard.metrics import GuardMetrics
        from gie_guard.policy import load_policy
        from gie_guard.report import AppliedConcept, GuardReport
        from gie_guard.serving import exposition

        def worker(n):
            metrics = GuardMetrics.for_registry(CollectorRegistry())
            metrics.set_policy(load_policy({"name": "p", "concepts": [{"id": "c", "text": "c", "scale": 2.0}]}))
            concept = AppliedConcept("c", "c", (1,), (2.0,), "policy", (0.5,))
            for _ in range(n):
                metrics.observe(GuardReport("p", "h", "X", (concept,), (0,), 1, (0.0, 1.0), True, 0.01, 0.1), "ok")

        if __name__ == "__main__":
            ctx = multiprocessing.get_context("fork")
            procs = [ctx.Process(target=worker, args=(n,)) for n in (2, 3)]
            [p.start() for p in procs]; [p.join() for p in procs]
            assert all(p.exitcode == 0 for p in procs)
            body, _ = exposition()  # no registry given: collects the directory
            sys.stdout.write(body.decode())
    """)
    (tmp_path / "mp.py").write_text(script)
    mpdir = tmp_path / "prom"
    mpdir.mkdir()
    env = {**__import__("os").environ, "PROMETHEUS_MULTIPROC_DIR": str(mpdir)}
    done = subprocess.run([sys.executable, str(tmp_path / "mp.py")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(done.stdout) for s in f.samples}
    assert value(samples, "gie_guard_generations_total", policy="p", outcome="ok") == 5
    assert value(samples, "gie_guard_concept_suppressions_total", policy="p", concept="c") == 5
    assert value(samples, "gie_guard_added_seconds_count", policy="p") == 5
    assert value(samples, "gie_guard_policy_concepts", policy="p") == 1  # livemax: not summed over workers


def test_grafana_dashboard_queries_only_metrics_that_exist():
    import json
    import pathlib

    registry = CollectorRegistry()
    Guard(policy={"name": "p", "concepts": [{"id": "c", "text": "c", "scale": 1.0, "verify": {"verifier": "fake"}}]},
          registry=registry, verifiers={"fake": StaticVerifier()}).close()
    exposed = {s.name for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"gie_guard_[a-z0-9_]+", target["expr"])}
    assert len(dashboard["panels"]) >= 10 and queried
    assert queried <= exposed, queried - exposed


def test_a_renamed_policy_retires_the_old_name(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: first\nconcepts: []\n")
    registry = CollectorRegistry()
    guard = Guard(policy=str(path), registry=registry)
    first_hash = guard.policy.content_hash
    path.write_text("name: second\nconcepts: []\n")
    assert guard.reload()
    samples = scrape_registry(registry)
    assert value(samples, "gie_guard_policy_info", policy="first", version="1", content_hash=first_hash) == 0
    assert value(samples, "gie_guard_policy_info", policy="second", version="1", content_hash=guard.policy.content_hash) == 1
    assert value(samples, "gie_guard_policy_reloads_total", policy="second", result="success") == 1
    guard.close()
