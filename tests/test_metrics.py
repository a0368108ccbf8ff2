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

from gie_guard import ConfigurationError, ContentBlockedError, Guard, GuardMetrics, SuppressionRule, start_metrics_server
from gie_guard.metrics import concept_suppressed, guard_label
from gie_guard.policy import PolicyStore
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
    guard = Guard(policy=str(path), metrics=GuardMetrics(registry), verifiers={"fake": verifier})

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

    # reloads and the active policy; the reload gauges carry the guard's policy source
    source = guard_label(str(path))
    assert source == f"coast.yaml@{source.rsplit('@', 1)[1]}" and len(source.rsplit("@", 1)[1]) == 8
    assert value(broken, "gie_guard_policy_last_reload_success", policy="coast", guard=source) == 0
    assert value(samples, "gie_guard_policy_last_reload_success", policy="coast", guard=source) == 1
    for result, n in [("failure", 1), ("success", 1), ("unchanged", 1)]:
        assert value(samples, "gie_guard_policy_reloads_total", policy="coast", result=result) == n
    assert value(samples, "gie_guard_policy_last_reload_success_timestamp_seconds", policy="coast", guard=source) >= \
        value(broken, "gie_guard_policy_last_reload_success_timestamp_seconds", policy="coast", guard=source)
    assert value(samples, "gie_guard_policy_info", policy="coast", version="1", content_hash=new_hash) == 1
    # the retired version's series is gone, not left at 0
    assert not any(n == "gie_guard_policy_info" and ("content_hash", old_hash) in labels for n, labels in samples)
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
_LABELS = {"policy", "concept", "outcome", "result", "action", "version", "content_hash", "guard", "le"}


def test_metric_names_follow_the_prometheus_rules():
    registry = CollectorRegistry()
    guard = Guard(policy={"name": "p", "concepts": [
        {"id": "c1", "text": "circle", "scale": 2.0, "verify": {"verifier": "fake"}}]},
        metrics=GuardMetrics(registry), verifiers={"fake": StaticVerifier()})
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


def test_metrics_are_an_explicit_object_configured_at_construction(monkeypatch):
    import gie_guard.metrics as metrics

    default = CollectorRegistry()  # stands in for the global registry, which tests never touch
    monkeypatch.setattr(metrics, "REGISTRY", default)
    strict = SuppressionRule(min_scale=2.0, min_attention=0.02)
    # built with its rule on the global registry before any guard: the process default is this one
    mine = GuardMetrics(rule=strict)
    assert GuardMetrics.default() is mine and mine.rule == strict and mine.registry is default
    # each registry has its own object and its own rule; nothing is fixed by whoever came first
    other = GuardMetrics(CollectorRegistry(), rule=SuppressionRule(min_scale=0.5))
    assert other.rule.min_scale == 0.5 and GuardMetrics.default().rule == strict
    with pytest.raises(ConfigurationError, match=r"has a GuardMetrics already.*Guard\(metrics=\.\.\.\)"):
        GuardMetrics(default)
    with pytest.raises(ConfigurationError, match="min_scale must be >= 0"):
        SuppressionRule(min_scale=-1.0)
    # the old way still works, deprecated: one object per registry, shared
    with pytest.warns(DeprecationWarning, match="for_registry"):
        assert GuardMetrics.for_registry(None) is mine
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigurationError, match="already uses"):
        GuardMetrics.for_registry(None, rule=SuppressionRule(min_scale=9.0))
    fresh = CollectorRegistry()
    with pytest.warns(DeprecationWarning):
        shared = GuardMetrics.for_registry(fresh)
    with pytest.warns(DeprecationWarning):
        assert GuardMetrics.for_registry(fresh) is shared and shared.rule == SuppressionRule()


def test_default_metrics_are_built_on_first_use(monkeypatch):
    import gie_guard.metrics as metrics

    monkeypatch.setattr(metrics, "REGISTRY", CollectorRegistry())
    first = GuardMetrics.default()
    assert first is GuardMetrics.default() and first.rule == SuppressionRule() and first.registry is metrics.REGISTRY


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
    """Two forked workers write to PROMETHEUS_MULTIPROC_DIR; one collector sums them. The
    policy-state gauges are pushed there (a scrape reads only the files), per policy source."""
    script = textwrap.dedent("""
        import json, multiprocessing, sys
        from prometheus_client import CollectorRegistry
        from gie_guard.metrics import GuardMetrics, guard_label
        from gie_guard.policy import PolicyStore, load_policy
        from gie_guard.report import AppliedConcept, GuardReport
        from gie_guard.serving import exposition

        POLICY = 'name: p\\nversion: "%s"\\ndescription: %s\\nconcepts: [{id: c, text: c, scale: 2.0}]\\n'

        def worker(n, path, action):
            metrics = GuardMetrics(CollectorRegistry())
            store = PolicyStore(path)
            metrics.track(store)
            concept = AppliedConcept("c", "c", (1,), (2.0,), "policy", (0.5,))
            for _ in range(n):
                with metrics.generation("p") as generation:
                    generation.observe(GuardReport("p", "h", "X", (concept,), (0,), 1, (0.0, 1.0), True, 0.01, 0.1))
            if action == "update":
                open(path, "w").write(POLICY % ("2", "updated"))
                assert store.reload()
            else:
                open(path, "w").write("concepts: [")
                assert not store.reload()

        if __name__ == "__main__":
            first, second = sys.argv[1], sys.argv[2]
            open(first, "w").write(POLICY % ("1", "first"))
            open(second, "w").write(POLICY % ("1", "second"))
            hashes = {"first_v1": load_policy(first).content_hash, "second": load_policy(second).content_hash}
            ctx = multiprocessing.get_context("fork")
            procs = [ctx.Process(target=worker, args=args) for args in ((2, first, "update"), (3, second, "break"))]
            [p.start() for p in procs]; [p.join() for p in procs]
            assert all(p.exitcode == 0 for p in procs)
            hashes["first_v2"] = load_policy(first).content_hash
            body, _ = exposition()  # no registry given: collects the directory
            sys.stdout.write(body.decode())
            sys.stderr.write(json.dumps({**hashes, "first_guard": guard_label(first), "second_guard": guard_label(second)}))
    """)
    (tmp_path / "mp.py").write_text(script)
    mpdir = tmp_path / "prom"
    mpdir.mkdir()
    env = {**__import__("os").environ, "PROMETHEUS_MULTIPROC_DIR": str(mpdir)}
    done = subprocess.run([sys.executable, str(tmp_path / "mp.py"), str(tmp_path / "p1.yaml"), str(tmp_path / "p2.yaml")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    names = __import__("json").loads(done.stderr.strip().splitlines()[-1])
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(done.stdout) for s in f.samples}
    assert value(samples, "gie_guard_generations_total", policy="p", outcome="ok") == 5
    assert value(samples, "gie_guard_concept_suppressions_total", policy="p", concept="c") == 5
    assert value(samples, "gie_guard_added_seconds_count", policy="p") == 5
    assert value(samples, "gie_guard_policy_concepts", policy="p") == 1  # livemax: not summed over workers
    # one reload gauge per policy source: the broken one does not hide the good one
    assert value(samples, "gie_guard_policy_last_reload_success", policy="p", guard=names["first_guard"]) == 1
    assert value(samples, "gie_guard_policy_last_reload_success", policy="p", guard=names["second_guard"]) == 0
    assert value(samples, "gie_guard_policy_reloads_total", policy="p", result="success") == 1
    assert value(samples, "gie_guard_policy_reloads_total", policy="p", result="failure") == 1
    # pushed: the retired version drops to 0 (a worker's file cannot forget a series)
    info = lambda key, version: value(samples, "gie_guard_policy_info", policy="p", version=version, content_hash=names[key])
    assert (info("first_v1", "1"), info("first_v2", "2"), info("second", "1")) == (0, 1, 1)


def test_grafana_dashboard_queries_only_metrics_that_exist():
    import json
    import pathlib

    registry = CollectorRegistry()
    guard = Guard(policy={"name": "p", "concepts": [{"id": "c", "text": "c", "scale": 1.0, "verify": {"verifier": "fake"}}]},
                  metrics=GuardMetrics(registry), verifiers={"fake": StaticVerifier()})
    exposed = {s.name for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    guard.close()  # after the scrape: the policy-state gauges are those of live guards
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    # the guard's metrics here; the service's (gie_guard_serve_*) against a real /metrics in
    # tests/test_dashboard.py. Row panels have no targets.
    queried = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
               for name in re.findall(r"gie_guard_[a-z0-9_]+", target["expr"]) if not name.startswith("gie_guard_serve_")}
    assert len(dashboard["panels"]) >= 10 and queried
    assert queried <= exposed, queried - exposed


def test_a_renamed_policy_retires_the_old_name(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: first\nconcepts: []\n")
    registry = CollectorRegistry()
    guard = Guard(policy=str(path), metrics=GuardMetrics(registry))
    first_hash = guard.policy.content_hash
    path.write_text("name: second\nconcepts: []\n")
    assert guard.reload()
    samples = scrape_registry(registry)
    assert ("gie_guard_policy_info", (("content_hash", first_hash), ("policy", "first"), ("version", "1"))) not in samples
    assert not any(labels and ("policy", "first") in labels for n, labels in samples if n.startswith("gie_guard_policy_last"))
    assert value(samples, "gie_guard_policy_info", policy="second", version="1", content_hash=guard.policy.content_hash) == 1
    assert value(samples, "gie_guard_policy_reloads_total", policy="second", result="success") == 1
    guard.close()


def _series(text):
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def test_two_guards_with_one_policy_name_keep_their_own_reload_gauges(tmp_path):
    """Same policy name, two files, one registry: a failed reload of one must not be hidden
    by (or overwrite) the other's success."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [tmp_path / "a" / "p.yaml", tmp_path / "b" / "p.yaml"]
    for path in paths:
        path.write_text("name: p\nconcepts: []\n")
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry)
    stores = [PolicyStore(str(path)) for path in paths]
    labels = [metrics.track(store) for store in stores]
    assert labels[0] != labels[1] and all(label.startswith("p.yaml@") for label in labels)
    assert labels == [guard_label(str(path)) for path in paths]
    paths[1].write_text("concepts: [")
    assert stores[0].reload() and not stores[1].reload()
    with start_metrics_server(0, registry=registry) as server:
        samples, _ = scrape(server.url)
    assert value(samples, "gie_guard_policy_last_reload_success", policy="p", guard=labels[0]) == 1
    assert value(samples, "gie_guard_policy_last_reload_success", policy="p", guard=labels[1]) == 0
    for label, store in zip(labels, stores):
        assert value(samples, "gie_guard_policy_last_reload_success_timestamp_seconds", policy="p", guard=label) == \
            pytest.approx(store.state.last_success_at)
    assert value(samples, "gie_guard_policy_reloads_total", policy="p", result="unchanged") == 1
    assert value(samples, "gie_guard_policy_reloads_total", policy="p", result="failure") == 1
    # a guard can also be named; names are checked so the label set stays bounded
    named = PolicyStore(str(paths[0]))
    assert metrics.track(named, guard="frontend") == "frontend"
    assert metrics.track(named, guard="ignored") == "frontend"  # tracked once
    with pytest.raises(ConfigurationError, match="guard name"):
        metrics.track(PolicyStore(str(paths[0])), guard="no spaces please")
    assert registry.get_sample_value("gie_guard_policy_last_reload_success", {"policy": "p", "guard": "frontend"}) == 1


def test_two_hundred_reloads_keep_the_series_count_bounded(tmp_path):
    path = tmp_path / "p.yaml"
    body = 'name: p\nversion: "%d"\nconcepts: [{id: c, text: circle, scale: 2.0}]\n'
    path.write_text(body % 0)
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry)
    store = PolicyStore(str(path))
    metrics.track(store)
    counts = []
    with start_metrics_server(0, registry=registry) as server:
        for version in range(1, 201):
            path.write_text(body % version)
            assert store.reload()
            if version in (1, 200):
                counts.append(len(scrape(server.url)[1].splitlines()))
        samples, text = scrape(server.url)
    assert counts[0] == counts[1]  # today's code: 91 series after one reload, 6,891 after 200
    info = [s for s in _series(text) if s.name == "gie_guard_policy_info"]
    assert [(s.labels["version"], s.value) for s in info] == [("200", 1.0)]
    assert value(samples, "gie_guard_policy_reloads_total", policy="p", result="success") == 200


def test_a_guard_that_is_gone_leaves_no_policy_state():
    import gc

    registry = CollectorRegistry()
    metrics = GuardMetrics(registry)
    store = PolicyStore({"name": "p", "concepts": []})
    assert metrics.track(store) == "object"
    assert registry.get_sample_value("gie_guard_policy_concepts", {"policy": "p"}) == 0
    del store
    gc.collect()
    assert registry.get_sample_value("gie_guard_policy_concepts", {"policy": "p"}) is None
    kept = PolicyStore({"name": "q", "concepts": []})
    metrics.track(kept)
    metrics.untrack(kept)  # a closed guard
    assert registry.get_sample_value("gie_guard_policy_info", {"policy": "q", "version": "1",
                                                                "content_hash": kept.current.content_hash}) is None
    # counters and histograms stay: they count what happened
    assert registry.get_sample_value("gie_guard_generations_total", {"policy": "q", "outcome": "ok"}) == 0


def _one_report(policy="p"):
    concept = AppliedConcept("c", "c", (1,), (2.0,), "policy", (0.5,))
    return GuardReport(policy, "h", "X", (concept,), (0,), 1, (0.0, 1.0), True, 0.01, 0.1)


def test_a_generation_is_counted_once_by_how_it_ends():
    """GuardMetrics.generation: the outcome is decided when the block ends. Anything that
    raises inside it after the report was observed makes the call an `error`, counted once."""
    from gie_guard.verifiers import Hit, Verification

    registry = CollectorRegistry()
    metrics = GuardMetrics(registry)
    count = lambda outcome: registry.get_sample_value("gie_guard_generations_total", {"policy": "p", "outcome": outcome}) or 0

    def on_report(report):
        raise RuntimeError("callback bug")

    with pytest.raises(RuntimeError, match="callback bug"):
        with metrics.generation("p") as generation:
            report = _one_report()
            generation.observe(report)
            on_report(report)
    assert (count("ok"), count("error")) == (0, 1)
    assert registry.get_sample_value("gie_guard_concept_scale_count", {"policy": "p", "concept": "c"}) == 1

    blurred = Verification((Hit("c", "v", (0,), "blur"),), {"c": 1}, 0.0)
    with metrics.generation("p") as generation:
        generation.observe(_one_report(), blurred)
    blocked = Verification((Hit("c", "v", (0,), "block"),), {"c": 1}, 0.0)
    with pytest.raises(ContentBlockedError):
        with metrics.generation("p") as generation:
            generation.observe(_one_report(), blocked)
            raise ContentBlockedError(_one_report(), blocked)
    with metrics.generation("p"):
        pass  # returned without a verification
    assert [count(o) for o in ("ok", "recorded", "blurred", "blocked", "error")] == [1, 0, 1, 1, 1]
    with pytest.raises(ConfigurationError, match="unknown outcome"):
        metrics.observe(_one_report(), "fine")


def test_guard_takes_an_explicit_metrics_object(sd_pipe):
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, rule=SuppressionRule(min_scale=50.0))
    guard = Guard(policy={"name": "p", "inhibit_steps": [0.0, 1.0], "concepts": [{"id": "c", "text": "circle", "scale": 3.0}]},
                  metrics=metrics)
    assert guard.metrics is metrics
    guard(sd_pipe, prompt="a circle", num_inference_steps=1, output_type="np")
    assert registry.get_sample_value("gie_guard_concept_suppressions_total", {"policy": "p", "concept": "c"}) == 0
    assert registry.get_sample_value("gie_guard_concept_applications_total", {"policy": "p", "concept": "c"}) == 1
    with pytest.raises(ConfigurationError, match="has a GuardMetrics already"):
        GuardMetrics(registry)
    guard.close()  # a closed guard leaves no policy state
    assert registry.get_sample_value("gie_guard_policy_concepts", {"policy": "p"}) is None


def test_guard_counts_a_call_whose_on_report_callback_raises_once(sd_pipe):
    """guard.py's rule: on_report runs after the call is counted; what it raises is logged
    and the guarded output is returned. Counted once, as `ok`, never also as `error`."""
    registry = CollectorRegistry()

    def on_report(report):
        raise RuntimeError("callback bug")

    guard = Guard(policy={"name": "p", "concepts": [{"id": "c", "text": "circle", "scale": 3.0}]},
                  metrics=GuardMetrics(registry), on_report=on_report)
    images = guard(sd_pipe, prompt="a circle", num_inference_steps=1, output_type="np").images
    assert images.shape[0] == 1
    get = lambda outcome: registry.get_sample_value("gie_guard_generations_total", {"policy": "p", "outcome": outcome})
    assert (get("ok"), get("error")) == (1, 0)
