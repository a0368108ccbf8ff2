"""Prometheus metrics of guarded generations, policy reloads and verifiers.

Every metric has the ``gie_guard_`` prefix, base units (seconds), ``_total`` on counters, and
labels from bounded sets only: the policy name, the concept id (both restricted by the
policy schema to ``[A-Za-z0-9_.-]``), an outcome, a reload result, a verifier action, and on
the two reload gauges the ``guard`` label (see :func:`guard_label`). Prompt text never becomes
a label. docs/observability.md lists every metric.

A :class:`GuardMetrics` is an explicit object: build it once per ``CollectorRegistry``
(``GuardMetrics(registry, rule=...)``) and pass it to every guard that reports there
(``Guard(metrics=...)``). :meth:`GuardMetrics.default` is the one of prometheus_client's
global registry, created with the default rule on first use unless one was built on it
before. A registry holds at most one GuardMetrics; a second is a ConfigurationError.

The policy-state gauges (last reload success and its time, ``policy_info``,
``policy_concepts``) are read at scrape time from the policy stores a GuardMetrics tracks
(weak references: a guard that is gone leaves no series, and a retired policy version
leaves none either). In multi-process mode (``PROMETHEUS_MULTIPROC_DIR``) a scrape reads
the workers' files instead, so there they are pushed to the files on every load and
reload.

When a concept counts as *suppressed* in a generation (``gie_guard_concept_suppressions_total``)
is decided by a :class:`SuppressionRule`: the concept was inhibited during at least one
denoising step, with a largest token scale of at least ``min_scale``, and its measured
first-step attention share (``AppliedConcept.attention``) was at least ``min_attention``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .errors import ConfigurationError, ContentBlockedError

if TYPE_CHECKING:
    from .policy import PolicySnapshot, PolicyStore, ReloadEvent
    from .report import AppliedConcept, GuardReport
    from .verifiers import Verification

__all__ = [
    "OUTCOMES",
    "PREFIX",
    "PolicyState",
    "RELOAD_RESULTS",
    "Generation",
    "GuardMetrics",
    "SuppressionRule",
    "concept_suppressed",
    "guard_label",
]

log = logging.getLogger("gie_guard.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

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
        if not (self.min_scale >= 0 and 0.0 <= self.min_attention <= 1.0):  # NaN fails too
            raise ConfigurationError(
                f"min_scale must be >= 0 and min_attention within [0, 1], got {self.min_scale}, {self.min_attention}"
            )


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


_GUARD_NAME = re.compile(r"[A-Za-z0-9_.:@/-]{1,64}")


def guard_label(source: str | None, name: str | None = None) -> str:
    """The ``guard`` label of the reload gauges: ``name`` when given (1-64 of
    ``[A-Za-z0-9_.:@/-]``), else derived from the policy source: ``shipped:NAME`` for a
    shipped policy, ``FILE@HASH8`` (the file name and 8 hex digits of the sha256 of its
    absolute path) for a file, ``object`` for a dict or Policy. One value per policy source
    a process loads, so the label set stays as small as the set of guards."""
    if name is not None:
        if not isinstance(name, str) or not _GUARD_NAME.fullmatch(name):
            raise ConfigurationError(f"a guard name is 1-64 of [A-Za-z0-9_.:@/-], got {name!r}")
        return name
    if source is None:
        return "object"
    if source.startswith("shipped:"):
        return source
    digest = hashlib.sha256(os.path.abspath(source).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{os.path.basename(source)[:48]}@{digest}"


@dataclass
class _Tracked:
    label: str
    plans: Any = None  # the guard's PlanCache (plans, bytes), if given


@dataclass
class PolicyState:
    """What the policy-state gauges show: ``reload`` (policy, guard) -> (last load or reload
    succeeded, its Unix time), ``info`` (policy, version, content hash) of the active
    policies, ``concepts`` per policy name."""

    reload: dict[tuple[str, str], tuple[bool, float | None]] = field(default_factory=dict)  # (policy, guard)
    info: set[tuple[str, str, str]] = field(default_factory=set)  # (policy, version, content_hash)
    concepts: dict[str, int] = field(default_factory=dict)  # policy -> concepts
    pending: dict[tuple[str, str], bool] = field(default_factory=dict)  # (policy, guard) -> a change awaits a retry
    plan_cache: dict[str, tuple[int, int]] = field(default_factory=dict)  # guard -> (plans, bytes)


_RELOAD_SUCCESS = (f"{PREFIX}_policy_last_reload_success",
                   "1 if the last policy reload (or the first load) of the guard's policy source succeeded, else 0.")
_RELOAD_TIME = (f"{PREFIX}_policy_last_reload_success_timestamp_seconds",
                "Unix time of the last successful policy load or reload of the guard's policy source.")
_INFO = (f"{PREFIX}_policy_info",
         "1 for each active policy's name, version (the operator's revision label) and content hash.")
_CONCEPTS = (f"{PREFIX}_policy_concepts", "Concepts of the active policy (after aliases and deduplication).")
_PENDING = (f"{PREFIX}_policy_reload_pending",
            "1 while a policy change failed for a reason other than its content and waits for a retry, else 0.")
_CACHE_PLANS = (f"{PREFIX}_plan_cache_plans", "Compiled plans the guard keeps (bounded by max_plans).")
_CACHE_BYTES = (f"{PREFIX}_plan_cache_bytes", "Bytes of the compiled plans the guard keeps (bounded by max_plan_bytes).")

_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, GuardMetrics] = weakref.WeakKeyDictionary()
_BY_REGISTRY_LOCK = threading.Lock()


class GuardMetrics:
    """The guard's metrics in one ``CollectorRegistry`` (default: prometheus_client's global
    ``REGISTRY``), with the :class:`SuppressionRule` that decides
    ``gie_guard_concept_suppressions_total``. Build one per registry and pass it to every
    guard that reports there: ``Guard(metrics=GuardMetrics(registry, rule=...))``.

    In multi-process mode (``PROMETHEUS_MULTIPROC_DIR`` set when the object is built) the
    values go to the shared directory; gauges carry the ``multiprocess_mode`` given in
    docs/observability.md.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, rule: SuppressionRule | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        rule = SuppressionRule() if rule is None else rule
        if not isinstance(rule, SuppressionRule):
            raise ConfigurationError(f"rule must be a SuppressionRule, got {type(rule).__name__}")
        self.registry = registry
        self.rule = rule
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self._lock = threading.Lock()
        self._tracked: weakref.WeakKeyDictionary[PolicyStore, _Tracked] = weakref.WeakKeyDictionary()
        self._pushed_info: set[tuple[str, str, str]] = set()  # multi-process: info series set to 1
        with _BY_REGISTRY_LOCK:
            other = _BY_REGISTRY.get(registry)
            if other is not None:
                raise ConfigurationError(
                    f"this registry has a GuardMetrics already ({other.rule}); pass that object to every Guard "
                    "(Guard(metrics=...)), or give this one its own CollectorRegistry"
                )
            self._register(registry)
            _BY_REGISTRY[registry] = self

    @classmethod
    def default(cls) -> GuardMetrics:
        """The GuardMetrics of prometheus_client's global registry: the one built on it, or
        one with the default rule, built now. Guards given no metrics use this."""
        return cls._of(REGISTRY, None)

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None, *, rule: SuppressionRule | None = None) -> GuardMetrics:
        """Deprecated: build ``GuardMetrics(registry, rule=...)`` once and pass it as
        ``Guard(metrics=...)``. Returns the registry's GuardMetrics, built on first use;
        a ``rule`` other than the one it has is a ConfigurationError."""
        warnings.warn(
            "GuardMetrics.for_registry() is deprecated: build GuardMetrics(registry, rule=...) once and pass it as "
            "Guard(metrics=...); GuardMetrics.default() is the global registry's",
            DeprecationWarning, stacklevel=2,
        )
        return cls._of(REGISTRY if registry is None else registry, rule)

    @classmethod
    def _of(cls, registry: CollectorRegistry, rule: SuppressionRule | None) -> GuardMetrics:
        with _BY_REGISTRY_LOCK:
            found = _BY_REGISTRY.get(registry)
        if found is None:
            try:
                return cls(registry, rule=rule)
            except ConfigurationError:  # another thread built it meanwhile
                with _BY_REGISTRY_LOCK:
                    found = _BY_REGISTRY.get(registry)
                if found is None:
                    raise
        if rule is not None and rule != found.rule:
            raise ConfigurationError(f"this registry's GuardMetrics already uses {found.rule}, not {rule}")
        return found

    def _register(self, registry: CollectorRegistry) -> None:
        made: list[Any] = []

        def add(metric: Any) -> Any:
            made.append(metric)
            return metric

        r = registry
        try:
            self.generations = add(Counter(
                f"{PREFIX}_generations_total", "Guarded generations by policy and outcome.",
                ["policy", "outcome"], registry=r))
            self.concept_applications = add(Counter(
                f"{PREFIX}_concept_applications_total",
                "Generations in which the concept was inhibited (at least one step, scale above 0).",
                ["policy", "concept"], registry=r))
            self.concept_suppressions = add(Counter(
                f"{PREFIX}_concept_suppressions_total",
                "Generations in which the concept counts as suppressed: inhibited, largest token scale "
                ">= min_scale and measured first-step attention share >= min_attention.",
                ["policy", "concept"], registry=r))
            self.concept_scale = add(Histogram(
                f"{PREFIX}_concept_scale", "Largest token scale applied to the concept per generation (unitless).",
                ["policy", "concept"], buckets=SCALE_BUCKETS, registry=r))
            self.concept_attention = add(Histogram(
                f"{PREFIX}_concept_attention_ratio",
                "The concept's measured first-step attention share on its own tokens (0-1) per generation.",
                ["policy", "concept"], buckets=RATIO_BUCKETS, registry=r))
            self.added_seconds = add(Histogram(
                f"{PREFIX}_added_seconds", "Seconds the guard added to a generation (plan compilation and inhibitors).",
                ["policy"], buckets=SECONDS_BUCKETS, registry=r))
            self.generation_seconds = add(Histogram(
                f"{PREFIX}_generation_duration_seconds", "Wall seconds of whole guarded generations.",
                ["policy"], buckets=SECONDS_BUCKETS, registry=r))
            self.reloads = add(Counter(
                f"{PREFIX}_policy_reloads_total", "Policy reloads by result (success, failure, unchanged).",
                ["policy", "result"], registry=r))
            self.verified_images = add(Counter(
                f"{PREFIX}_verified_images_total", "Images a verifier checked for the concept.",
                ["policy", "concept"], registry=r))
            self.residual_detections = add(Counter(
                f"{PREFIX}_residual_detections_total",
                "Images in which a verifier still found the concept after generation, by the concept's policy action.",
                ["policy", "concept", "action"], registry=r))
            self.verification_seconds = add(Histogram(
                f"{PREFIX}_verification_duration_seconds", "Seconds spent running verifiers per generation.",
                ["policy"], buckets=SECONDS_BUCKETS, registry=r))
            if self.multiprocess:
                # A scrape reads only the workers' files: these gauges are pushed (see _push).
                self._gauges = (
                    add(Gauge(*_RELOAD_SUCCESS, ["policy", "guard"], registry=r, multiprocess_mode="livemin")),
                    add(Gauge(*_RELOAD_TIME, ["policy", "guard"], registry=r, multiprocess_mode="livemax")),
                    add(Gauge(*_INFO, ["policy", "version", "content_hash"], registry=r, multiprocess_mode="livemax")),
                    add(Gauge(*_CONCEPTS, ["policy"], registry=r, multiprocess_mode="livemax")),
                    add(Gauge(*_PENDING, ["policy", "guard"], registry=r, multiprocess_mode="livemax")),
                    add(Gauge(*_CACHE_PLANS, ["guard"], registry=r, multiprocess_mode="livesum")),
                    add(Gauge(*_CACHE_BYTES, ["guard"], registry=r, multiprocess_mode="livesum")),
                )
            else:
                r.register(add(_PolicyStateCollector(self)))
        except ValueError as exc:  # "Duplicated timeseries": something else registered our names
            for metric in made:
                with contextlib.suppress(KeyError):
                    r.unregister(metric)
            raise ConfigurationError(f"cannot register gie_guard's metrics in this registry: {exc}") from exc

    def __repr__(self) -> str:
        with self._lock:
            guards = sorted(t.label for t in self._tracked.values())
        return f"GuardMetrics(rule={self.rule}, guards={guards}, multiprocess={self.multiprocess})"

    # -- policy -----------------------------------------------------------------------------
    def track(self, store: PolicyStore, *, guard: str | None = None, plans: Any = None) -> str:
        """Report ``store``'s policy state (reload gauges, ``policy_info``, concepts) from now on,
        and count its reloads. ``guard`` names it in the reload gauges' ``guard`` label
        (default: derived from the policy source, :func:`guard_label`). ``plans``: the guard's
        plan cache (its size goes to the plan-cache gauges). Returns the label.
        Tracking the same store again changes nothing. The store is held weakly."""
        label = guard_label(store.current.source, guard)
        with self._lock:
            found = self._tracked.get(store)
            if found is not None:
                return found.label
            self._tracked[store] = _Tracked(label, plans)
        if plans is not None and self.multiprocess:
            plans.on_change = self._push
        self._touch(store.current)
        store_ref = weakref.ref(store)  # a strong one would keep the store (and its guard) alive

        def listener(event: ReloadEvent) -> None:
            tracked = store_ref()
            if tracked is not None and tracked in self._tracked:  # untracked: a no-op
                self._on_reload(event)

        store.add_listener(listener)
        if self.multiprocess:
            self._push()
        return label

    def untrack(self, store: PolicyStore) -> None:
        """Stop reporting ``store`` (a closed guard): its policy-state series go away."""
        with self._lock:
            self._tracked.pop(store, None)
        if self.multiprocess:
            self._push()

    def _on_reload(self, event: ReloadEvent) -> None:
        self.reloads.labels(event.snapshot.name, event.result).inc()
        if event.result == "success":
            self._touch(event.snapshot)
        if self.multiprocess:
            self._push()

    def policy_state(self) -> PolicyState:
        """What the policy-state gauges show now, from the tracked stores. Stores that share a
        label set are merged: the reload gauge takes the worst (0 if any failed), the time and
        the concept count the largest."""
        with self._lock:
            tracked = [(store, entry.label, entry.plans) for store, entry in self._tracked.items()]
        state = PolicyState()
        for store, label, plans in tracked:
            snapshot, reloads = store.current, store.state
            key = (snapshot.name, label)
            state.pending[key] = state.pending.get(key, False) or reloads.pending
            if plans is not None:
                held, size = state.plan_cache.get(label, (0, 0))
                state.plan_cache[label] = (held + plans.plans, size + plans.bytes)
            ok, at = reloads.last_result != "failure", reloads.last_success_at
            if key in state.reload:
                was_ok, was_at = state.reload[key]
                ok, at = ok and was_ok, max((t for t in (at, was_at) if t is not None), default=None)
            state.reload[key] = (ok, at)
            state.info.add((snapshot.name, snapshot.policy.version, snapshot.content_hash))
            state.concepts[snapshot.name] = max(len(snapshot.concepts), state.concepts.get(snapshot.name, 0))
        return state

    def _push(self) -> None:
        """Multi-process mode: write the policy state to this worker's files. A retired
        ``policy_info`` series is set to 0 (prometheus_client cannot delete a key from a
        worker's file; it goes when the worker does)."""
        success, when, info, concepts, pending, cache_plans, cache_bytes = self._gauges
        state = self.policy_state()
        with self._lock:
            for (policy, label), waiting in state.pending.items():
                pending.labels(policy, label).set(1.0 if waiting else 0.0)
            for label, (held, size) in state.plan_cache.items():
                cache_plans.labels(label).set(held)
                cache_bytes.labels(label).set(size)
            for (policy, label), (ok, at) in state.reload.items():
                success.labels(policy, label).set(1.0 if ok else 0.0)
                if at is not None:
                    when.labels(policy, label).set(at)
            for retired in self._pushed_info - state.info:
                info.labels(*retired).set(0)
            for shown in state.info:
                info.labels(*shown).set(1)
            self._pushed_info = set(state.info)
            for policy, n in state.concepts.items():
                concepts.labels(policy).set(n)

    def _touch(self, snapshot: PolicySnapshot) -> None:
        """Create the label children of ``snapshot``'s policy and concepts at zero, so the
        series exist before the first generation."""
        name = snapshot.name
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

    # -- generations ------------------------------------------------------------------------
    @contextlib.contextmanager
    def generation(self, policy: str) -> Iterator[Generation]:
        """Count one guarded call in ``gie_guard_generations_total`` exactly once, by how it
        ends: returned -> the verification's outcome (``ok`` without one); raised
        ``ContentBlockedError`` -> ``blocked``; raised anything else -> ``error``, also
        after the report was observed (an ``on_report`` callback that raises)::

            with metrics.generation(snapshot.name) as generation:
                ...                                            # the guarded call
                generation.observe(report, verification)       # per-concept metrics, once
                on_report(report)
                if blocked: raise ContentBlockedError(...)
        """
        generation = Generation(self, policy)
        try:
            yield generation
        except ContentBlockedError:
            self.generations.labels(policy, "blocked").inc()
            raise
        except BaseException:
            self.generations.labels(policy, "error").inc()
            raise
        self.generations.labels(policy, generation.outcome).inc()

    def observe(self, report: GuardReport, outcome: str, verification: Verification | None = None) -> None:
        """Count one generation that produced a report, with its outcome. Prefer
        :meth:`generation`, which decides the outcome by how the call ends."""
        if outcome not in OUTCOMES:
            raise ConfigurationError(f"unknown outcome {outcome!r}; one of {OUTCOMES}")
        self.observe_report(report, verification)
        self.generations.labels(report.policy_name, outcome).inc()

    def observe_error(self, policy: str) -> None:
        """Count one generation that raised before it had a report (outcome ``error``)."""
        self.generations.labels(policy, "error").inc()

    def observe_report(self, report: GuardReport, verification: Verification | None = None) -> None:
        """Every metric of one generation's report and verification except
        ``gie_guard_generations_total`` (which :meth:`generation` counts)."""
        policy = report.policy_name
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


class Generation:
    """One guarded call inside :meth:`GuardMetrics.generation`."""

    def __init__(self, metrics: GuardMetrics, policy: str) -> None:
        self._metrics = metrics
        self.policy = policy
        self.outcome = "ok"
        self._observed = False

    def observe(self, report: GuardReport, verification: Verification | None = None) -> None:
        """Record the call's report and verification (once); the outcome if it returns is
        the verification's."""
        if self._observed:
            raise ConfigurationError("a generation's report is observed once")
        self._observed = True
        self._metrics.observe_report(report, verification)
        self.outcome = verification.outcome if verification is not None else "ok"


class _PolicyStateCollector:
    """Reads the policy-state gauges from the tracked stores at scrape time."""

    def __init__(self, metrics: GuardMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(*_RELOAD_SUCCESS, labels=["policy", "guard"]),
                GaugeMetricFamily(*_RELOAD_TIME, labels=["policy", "guard"]),
                GaugeMetricFamily(*_INFO, labels=["policy", "version", "content_hash"]),
                GaugeMetricFamily(*_CONCEPTS, labels=["policy"]),
                GaugeMetricFamily(*_PENDING, labels=["policy", "guard"]),
                GaugeMetricFamily(*_CACHE_PLANS, labels=["guard"]),
                GaugeMetricFamily(*_CACHE_BYTES, labels=["guard"])]

    def collect(self) -> list[GaugeMetricFamily]:
        success, when, info, concepts, pending, cache_plans, cache_bytes = self.describe()
        state = self._metrics.policy_state()
        for (policy, label), waiting in sorted(state.pending.items()):
            pending.add_metric([policy, label], 1.0 if waiting else 0.0)
        for label, (held, size) in sorted(state.plan_cache.items()):
            cache_plans.add_metric([label], float(held))
            cache_bytes.add_metric([label], float(size))
        for (policy, label), (ok, at) in sorted(state.reload.items()):
            success.add_metric([policy, label], 1.0 if ok else 0.0)
            if at is not None:
                when.add_metric([policy, label], at)
        for shown in sorted(state.info):
            info.add_metric(list(shown), 1.0)
        for policy, n in sorted(state.concepts.items()):
            concepts.add_metric([policy], float(n))
        return [success, when, info, concepts, pending, cache_plans, cache_bytes]


def _verified_concept_ids(snapshot: PolicySnapshot) -> list[str]:
    from .verifiers import verify_settings

    return list(verify_settings(snapshot))
