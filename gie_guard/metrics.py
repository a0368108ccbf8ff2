"""Prometheus metrics of guarded generations, policy reloads and verifiers.

Every metric has the ``gie_guard_`` prefix, base units (seconds), ``_total`` on counters, and
labels from bounded sets only: the policy name, the concept id (both restricted by the
policy schema to ``[A-Za-z0-9_.-]``), an outcome, a reload result or a verifier action.
Prompt text never becomes a label. docs/observability.md lists every metric.

One :class:`GuardMetrics` exists per ``CollectorRegistry`` (``GuardMetrics.for_registry``),
so any number of guards in one process share it and never register a series twice. The
policy label tells guards with different policies apart; guards that share a policy name
add up into the same series.

When a concept counts as *suppressed* in a generation (``gie_guard_concept_suppressions_total``)
is decided by a :class:`SuppressionRule`: the concept was inhibited during at least one
denoising step, with a largest token scale of at least ``min_scale``, and its measured
first-step attention share (``AppliedConcept.attention``) was at least ``min_attention``.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from .policy import PolicySnapshot, PolicyStore, ReloadEvent
    from .report import AppliedConcept, GuardReport
    from .verifiers import Verification

__all__ = [
    "OUTCOMES",
    "PREFIX",
    "RELOAD_RESULTS",
    "GuardMetrics",
    "SuppressionRule",
    "concept_suppressed",
]

log = logging.getLogger("gie_guard.metrics")

PREFIX = "gie_guard"
# outcome of one guarded generation
#   ok       images returned as generated (verifiers, if any, found nothing to act on)
#   recorded a verifier found a residual concept and the policy said `record`: images returned
#   blurred  a verifier found a residual concept and the affected images were blurred
#   blocked  a verifier found a residual concept and the call raised ContentBlockedError
#   error    the call raised anything else (GuardError or the pipeline's own error)
OUTCOMES = ("ok", "recorded", "blurred", "blocked", "error")
RELOAD_RESULTS = ("success", "failure", "unchanged")
ACTIONS = ("record", "blur", "block")

SCALE_BUCKETS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0)
RATIO_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class SuppressionRule:
    """When a concept counts as suppressed in one generation.

    All three must hold: the concept was inhibited in at least one denoising step; its
    largest token scale ``w`` is at least ``min_scale``; and its measured first-step
    attention share (the share of the concept's own softmax that falls on its own tokens,
    averaged over the cross-attention layers) is at least ``min_attention``. A concept
    whose attention was not measured counts when ``min_attention`` is 0.

    The defaults: a scale below 1 barely changes an image on SD 1.x (the paper's fixed
    scales are 1-5), and a share of 0.01 is about one token's share of a uniform
    attention over 77 slots, so only concepts the image attends to less than that (e.g.
    lost in the start-token sink) are left out. Tune both with the
    ``gie_guard_concept_attention_ratio`` histogram.
    """

    min_scale: float = 1.0
    min_attention: float = 0.01

    def __post_init__(self) -> None:
        if self.min_scale < 0 or not 0.0 <= self.min_attention <= 1.0:
            raise ValueError("min_scale must be >= 0 and min_attention within [0, 1]")


def concept_suppressed(concept: AppliedConcept, report: GuardReport, rule: SuppressionRule = SuppressionRule()) -> bool:
    """Whether ``concept`` counts as suppressed in the generation ``report`` describes."""
    if not report.steps_inhibited or not concept.token_scales:
        return False
    if max(concept.token_scales) < rule.min_scale:
        return False
    attention = concept.attention
    if attention is None:
        return rule.min_attention == 0.0
    return attention >= rule.min_attention


class GuardMetrics:
    """The guard's metrics in one registry. Get it with :meth:`for_registry` (one per registry).

    ``registry=None`` means prometheus_client's default ``REGISTRY``. In multi-process mode
    (``PROMETHEUS_MULTIPROC_DIR`` set) the values go to the shared directory; gauges carry
    the ``multiprocess_mode`` given in docs/observability.md.
    """

    _instances: weakref.WeakKeyDictionary[CollectorRegistry, GuardMetrics] = weakref.WeakKeyDictionary()
    _instances_lock = threading.Lock()

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None, *, rule: SuppressionRule | None = None) -> GuardMetrics:
        """The registry's shared instance, created on first use. ``rule`` applies only when
        it is created; a different rule for an existing instance is an error."""
        registry = REGISTRY if registry is None else registry
        with cls._instances_lock:
            metrics = cls._instances.get(registry)
            if metrics is None:
                metrics = cls._instances[registry] = cls(registry, rule=rule or SuppressionRule())
            elif rule is not None and rule != metrics.rule:
                raise ValueError(f"this registry's GuardMetrics already uses {metrics.rule}, not {rule}")
            return metrics

    def __init__(self, registry: CollectorRegistry, *, rule: SuppressionRule = SuppressionRule()) -> None:
        # Direct construction registers the metrics in `registry`; a second instance on the
        # same registry raises prometheus_client's "Duplicated timeseries". Use for_registry.
        self.registry = registry
        self.rule = rule
        self._lock = threading.Lock()
        self._info: dict[str, tuple[str, str]] = {}  # policy name -> (version, content hash) shown
        r = registry
        self.generations = Counter(
            f"{PREFIX}_generations_total", "Guarded generations by policy and outcome.",
            ["policy", "outcome"], registry=r)
        self.concept_applications = Counter(
            f"{PREFIX}_concept_applications_total",
            "Generations in which the concept was inhibited (at least one step, scale above 0).",
            ["policy", "concept"], registry=r)
        self.concept_suppressions = Counter(
            f"{PREFIX}_concept_suppressions_total",
            "Generations in which the concept counts as suppressed: inhibited, largest token scale "
            ">= min_scale and measured first-step attention share >= min_attention.",
            ["policy", "concept"], registry=r)
        self.concept_scale = Histogram(
            f"{PREFIX}_concept_scale", "Largest token scale applied to the concept per generation (unitless).",
            ["policy", "concept"], buckets=SCALE_BUCKETS, registry=r)
        self.concept_attention = Histogram(
            f"{PREFIX}_concept_attention_ratio",
            "The concept's measured first-step attention share on its own tokens (0-1) per generation.",
            ["policy", "concept"], buckets=RATIO_BUCKETS, registry=r)
        self.added_seconds = Histogram(
            f"{PREFIX}_added_seconds", "Seconds the guard added to a generation (plan compilation and inhibitors).",
            ["policy"], buckets=SECONDS_BUCKETS, registry=r)
        self.generation_seconds = Histogram(
            f"{PREFIX}_generation_duration_seconds", "Wall seconds of whole guarded generations.",
            ["policy"], buckets=SECONDS_BUCKETS, registry=r)
        self.reloads = Counter(
            f"{PREFIX}_policy_reloads_total", "Policy reloads by result (success, failure, unchanged).",
            ["policy", "result"], registry=r)
        self.last_reload_success = Gauge(
            f"{PREFIX}_policy_last_reload_success", "1 if the last policy reload (or the first load) succeeded, else 0.",
            ["policy"], registry=r, multiprocess_mode="livemin")
        self.last_reload_success_time = Gauge(
            f"{PREFIX}_policy_last_reload_success_timestamp_seconds",
            "Unix time of the last successful policy load or reload.",
            ["policy"], registry=r, multiprocess_mode="livemax")
        self.policy_info = Gauge(
            f"{PREFIX}_policy_info", "1 for the active policy's name, version (the operator's revision label) and content hash.",
            ["policy", "version", "content_hash"], registry=r, multiprocess_mode="livemax")
        self.policy_concepts = Gauge(
            f"{PREFIX}_policy_concepts", "Concepts of the active policy (after aliases and deduplication).",
            ["policy"], registry=r, multiprocess_mode="livemax")
        self.verified_images = Counter(
            f"{PREFIX}_verified_images_total", "Images a verifier checked for the concept.",
            ["policy", "concept"], registry=r)
        self.residual_detections = Counter(
            f"{PREFIX}_residual_detections_total",
            "Images in which a verifier still found the concept after generation, by the concept's policy action.",
            ["policy", "concept", "action"], registry=r)
        self.verification_seconds = Histogram(
            f"{PREFIX}_verification_duration_seconds", "Seconds spent running verifiers per generation.",
            ["policy"], buckets=SECONDS_BUCKETS, registry=r)

    def __repr__(self) -> str:
        return f"GuardMetrics(policies={sorted(self._info)}, rule={self.rule})"

    # -- policy -----------------------------------------------------------------------------
    def track(self, store: PolicyStore) -> None:
        """Show ``store``'s policy now and follow its reloads."""
        state = store.state
        self.set_policy(store.current)
        name = store.current.name
        self.last_reload_success.labels(name).set(1.0 if state.last_result != "failure" else 0.0)
        if state.last_success_at is not None:
            self.last_reload_success_time.labels(name).set(state.last_success_at)
        shown = [store.current]

        def listener(event: ReloadEvent) -> None:
            old = shown[0]
            self.on_reload(event)
            if event.result == "success":
                shown[0] = event.snapshot
                if event.snapshot.name != old.name:  # renamed: the old name is no longer active
                    self.retire(old)

        store.add_listener(listener)

    def retire(self, snapshot: PolicySnapshot) -> None:
        """``snapshot`` is no longer active: its ``gie_guard_policy_info`` series drops to 0."""
        with self._lock:
            if self._info.get(snapshot.name) == (snapshot.policy.version, snapshot.content_hash):
                del self._info[snapshot.name]
                self.policy_info.labels(snapshot.name, snapshot.policy.version, snapshot.content_hash).set(0)

    def set_policy(self, snapshot: PolicySnapshot) -> None:
        """Show ``snapshot`` as its policy's active version and create its series at zero."""
        name = snapshot.name
        with self._lock:
            shown = (snapshot.policy.version, snapshot.content_hash)
            old = self._info.get(name)
            if old is not None and old != shown:
                # set, not remove: in multi-process mode a removed child keeps its last value
                self.policy_info.labels(name, *old).set(0)
            self._info[name] = shown
            self.policy_info.labels(name, *shown).set(1)
        self.policy_concepts.labels(name).set(len(snapshot.concepts))
        for outcome in OUTCOMES:
            self.generations.labels(name, outcome)
        for result in RELOAD_RESULTS:
            self.reloads.labels(name, result)
        self.added_seconds.labels(name)
        self.generation_seconds.labels(name)
        for concept in snapshot.concepts:
            for metric in (self.concept_applications, self.concept_suppressions, self.concept_scale, self.concept_attention):
                metric.labels(name, concept.id)
        verified = _verified_concept_ids(snapshot)
        for concept_id in verified:
            self.verified_images.labels(name, concept_id)
            for action in ACTIONS:
                self.residual_detections.labels(name, concept_id, action)
        if verified:
            self.verification_seconds.labels(name)

    def on_reload(self, event: ReloadEvent) -> None:
        """A ``PolicyStore`` listener: count the reload and show the live policy."""
        name = event.snapshot.name
        self.reloads.labels(name, event.result).inc()
        if event.result == "failure":
            self.last_reload_success.labels(name).set(0)
            return
        self.last_reload_success.labels(name).set(1)
        self.last_reload_success_time.labels(name).set(time.time())
        if event.result == "success":
            self.set_policy(event.snapshot)

    # -- generations ------------------------------------------------------------------------
    def observe(self, report: GuardReport, outcome: str, verification: Verification | None = None) -> None:
        """Count one generation that produced a report (outcomes ok, recorded, blurred, blocked)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; one of {OUTCOMES}")
        policy = report.policy_name
        self.generations.labels(policy, outcome).inc()
        self.added_seconds.labels(policy).observe(report.added_seconds)
        self.generation_seconds.labels(policy).observe(report.call_seconds)
        inhibited = bool(report.steps_inhibited)
        for concept in report.concepts:
            scale = max(concept.token_scales, default=0.0)
            self.concept_scale.labels(policy, concept.id).observe(scale)
            if concept.attention is not None:
                self.concept_attention.labels(policy, concept.id).observe(concept.attention)
            if inhibited and scale > 0:
                self.concept_applications.labels(policy, concept.id).inc()
            if concept_suppressed(concept, report, self.rule):
                self.concept_suppressions.labels(policy, concept.id).inc()
        if verification is not None:
            self.verification_seconds.labels(policy).observe(verification.seconds)
            for concept_id, images in verification.checked.items():
                self.verified_images.labels(policy, concept_id).inc(images)
            for hit in verification.hits:
                self.residual_detections.labels(policy, hit.concept_id, hit.action).inc(len(hit.images))

    def observe_error(self, policy: str) -> None:
        """Count one generation that raised (outcome ``error``)."""
        self.generations.labels(policy, "error").inc()


def _verified_concept_ids(snapshot: PolicySnapshot) -> list[str]:
    from .verifiers import verify_settings

    return list(verify_settings(snapshot))
