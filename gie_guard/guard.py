"""Guard: the object an application holds. It owns the live policy, compiles it for each
pipeline it meets, and wraps every generator call in growth-inhibitor processors."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .adapters import AdapterLibrary, AutoChoice, Fingerprint, check_feature_pass, scale_inference
from .engine import ConceptSpec, Plan, StepWindow, compile_plan, detect_family, installed
from .errors import GuardedCallError, GuardError, PolicyError
from .policy import PolicySnapshot, PolicyStore
from .metrics import GuardMetrics
from .report import AppliedConcept, GuardReport
from .verifiers import ContentBlockedError, Verifier, check_verifiers, default_verifiers, run_verifiers

logger = logging.getLogger("gie_guard")

# One lock per pipeline: a pipeline (its scheduler, its processors) serves one call at a time.
_PIPELINE_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_PIPELINE_LOCKS_GUARD = threading.Lock()


def _pipeline_lock(pipe: Any) -> threading.RLock:
    with _PIPELINE_LOCKS_GUARD:
        lock = _PIPELINE_LOCKS.get(pipe)
        if lock is None:
            lock = _PIPELINE_LOCKS[pipe] = threading.RLock()
        return lock


def _unguarded_call(pipe: Any) -> Callable[..., Any]:
    """The pipeline's own ``__call__``, also while a guard is attached to it."""
    base = getattr(type(pipe), "_gie_guard_base", type(pipe))
    return base.__call__.__get__(pipe)


class Guard:
    """Guard generator calls with a concept policy.

    ``policy`` is the name of a shipped policy (``"nsfw"``), a path to a YAML file, a
    :class:`~gie_guard.policy.Policy` or a plain dict. With ``watch=True`` the file is
    watched and reloaded when its content changes; a broken file on reload keeps the last
    good policy live.

    Use it in one of three ways::

        images = guard(pipe, prompt="...").images         # one guarded call
        guarded = guard.wrap(pipe); guarded(prompt="...")  # called exactly like the pipeline
        with guard.attached(pipe): other_code(pipe)        # guard calls other code makes

    After each call ``guard.last_report`` (per thread) says what was applied.

    ``scale: auto`` concepts get their scale from an adapter (docs/adapters.md): ``adapters``
    names extra folders, files or adapter objects, searched before the shipped ones;
    ``feature_pass`` is ``"auto"``, ``"probe"`` or ``"reuse"`` (how step 0 is measured).

    Metrics go to ``registry`` (a prometheus_client ``CollectorRegistry``; default: the
    global one), shared by every guard on it. ``verifiers`` adds or replaces verifiers by
    name for the policy's ``verify`` keys (docs/observability.md).
    """

    def __init__(
        self,
        policy: Any = "nsfw",
        *,
        watch: bool = False,
        embedder: Any = None,
        on_report: Callable[[GuardReport], None] | None = None,
        registry: Any = None,
        verifiers: Mapping[str, Verifier] | None = None,
        adapters: Any = (),
        feature_pass: str = "auto",
    ) -> None:
        self._adapters = adapters if isinstance(adapters, AdapterLibrary) else AdapterLibrary(adapters)
        self._feature_pass = check_feature_pass(feature_pass)
        # per compiled plan: how its auto concepts get their scales on that plan's pipeline
        self._auto_choices: weakref.WeakKeyDictionary[Plan, tuple[AutoChoice, ...]] = weakref.WeakKeyDictionary()
        self._store = PolicyStore(policy, watch=watch, embedder=embedder)
        self._on_report = on_report
        # metrics go to `registry` (a prometheus_client CollectorRegistry; default: the global
        # one), shared by every guard on it; verifiers by name (see gie_guard.verifiers)
        self._verifiers = {**default_verifiers(), **(verifiers or {})}
        check_verifiers(self._store.current, self._verifiers)
        self._metrics = GuardMetrics.for_registry(registry)
        self._metrics.track(self._store)
        self._local = threading.local()
        # compiled plans per pipeline, keyed by (policy content hash, clip_skip)
        self._plans: weakref.WeakKeyDictionary[Any, dict[tuple[str, int | None], Plan]] = weakref.WeakKeyDictionary()
        self._plans_lock = threading.Lock()

    # -- policy -----------------------------------------------------------------------------
    @property
    def policy(self) -> PolicySnapshot:
        """The live policy snapshot."""
        return self._store.current

    @property
    def store(self) -> PolicyStore:
        return self._store

    def reload(self) -> bool:
        """Re-read the policy source now. False (and the last good policy stays live) when
        the new content is invalid."""
        return self._store.reload()

    def close(self) -> None:
        """Stop watching the policy file."""
        self._store.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last_report(self) -> GuardReport | None:
        """The report of this thread's last guarded call."""
        return getattr(self._local, "report", None)

    # -- calls ------------------------------------------------------------------------------
    def __call__(self, pipe: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``pipe(*args, **kwargs)`` guarded, and return the pipeline's usual output."""
        return self._guarded_call(pipe, args, kwargs)

    def wrap(self, pipe: Any) -> GuardedPipeline:
        """An object called exactly like ``pipe``; every call is guarded."""
        detect_family(pipe)
        return GuardedPipeline(self, pipe)

    @contextlib.contextmanager
    def attached(self, pipe: Any) -> Iterator[Any]:
        """Within the block, every call of ``pipe`` (by any code) is guarded."""
        detect_family(pipe)
        cls = type(pipe)
        if hasattr(cls, "_gie_guard_base"):
            raise GuardError(f"a guard is already attached to this {cls._gie_guard_base.__name__}")
        guard = self

        def guarded_call(self_pipe: Any, *args: Any, **kwargs: Any) -> Any:
            return guard._guarded_call(self_pipe, args, kwargs)

        # A subclass whose __call__ is guarded: `pipe(...)` looks __call__ up on the type.
        pipe.__class__ = type(cls.__name__, (cls,), {"__call__": guarded_call, "_gie_guard_base": cls})
        try:
            yield pipe
        finally:
            pipe.__class__ = cls

    def plan_for(self, pipe: Any, snapshot: PolicySnapshot | None = None, *, clip_skip: int | None = None) -> Plan:
        """The compiled plan of ``snapshot`` (default: the live policy) for ``pipe``; cached."""
        return self._plan(pipe, snapshot or self._store.current, clip_skip)[0]

    def _plan(self, pipe: Any, snapshot: PolicySnapshot, clip_skip: int | None) -> tuple[Plan, float]:
        """The cached plan, and the seconds spent compiling it now (0 when it was cached)."""
        key = (snapshot.content_hash, clip_skip)
        with self._plans_lock:
            plan = self._plans.setdefault(pipe, {}).get(key)
        if plan is not None:
            return plan, 0.0
        specs, choices = self._concept_specs(snapshot, pipe)
        plan = compile_plan(pipe, specs, self._window(snapshot), clip_skip=clip_skip)
        with self._plans_lock:
            self._auto_choices[plan] = choices
            plans = self._plans.setdefault(pipe, {})
            for stale in [k for k in plans if k[0] != snapshot.content_hash]:
                del plans[stale]  # keep only the live policy's plans
            plans[key] = plan
        return plan, plan.compile_seconds

    @property
    def metrics(self) -> GuardMetrics:
        """The metrics this guard reports to (shared by all guards on its registry)."""
        return self._metrics

    def _guarded_call(self, pipe: Any, args: tuple, kwargs: dict) -> Any:
        snapshot = self._store.current  # read once: a call never mixes two policies
        try:
            return self._guarded_call_with(snapshot, pipe, args, kwargs)
        except ContentBlockedError:
            raise  # counted as `blocked`
        except Exception:
            self._metrics.observe_error(snapshot.name)  # fail closed, but counted
            raise

    def _guarded_call_with(self, snapshot: PolicySnapshot, pipe: Any, args: tuple, kwargs: dict) -> Any:
        started = time.perf_counter()
        family = detect_family(pipe)
        with _pipeline_lock(pipe):
            plan, compile_seconds = self._plan(pipe, snapshot, kwargs.get("clip_skip"))
            choices = self._auto_choices.get(plan, ())
            with installed(pipe, plan) as state, scale_inference(pipe, plan, state, choices, self._feature_pass) as inference:
                output = _unguarded_call(pipe)(*args, **kwargs)
        if state is not None and state.total_steps is not None and state.step + 1 != state.total_steps:
            raise GuardedCallError(
                f"{family.pipeline_class} ran its UNet {state.step + 1} times for {state.total_steps} "
                "denoising steps; the step window may not have been applied as configured, so the "
                "output is withheld"
            )
        report = self._report(snapshot, plan, state, compile_seconds, time.perf_counter() - started, inference)
        output, verification = run_verifiers(snapshot, output, self._verifiers)
        self._metrics.observe(report, verification.outcome if verification else "ok", verification)
        self._local.report = report
        logger.debug(
            "guarded call: policy=%s concepts=%s steps=%d/%d added=%.4fs",
            report.policy_name,
            ",".join(report.concept_ids),
            len(report.steps_inhibited),
            report.total_steps,
            report.added_seconds,
        )
        if self._on_report is not None:
            self._on_report(report)
        if verification is not None and verification.action == "block":
            raise ContentBlockedError(report, verification)
        return output

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _window(snapshot: PolicySnapshot) -> StepWindow:
        start, end = snapshot.policy.inhibit_steps
        return StepWindow(float(start), float(end))

    def _concept_specs(self, snapshot: PolicySnapshot, pipe: Any) -> tuple[list[ConceptSpec], tuple[AutoChoice, ...]]:
        specs, choices = [], []
        fingerprint = None
        for concept in snapshot.concepts:
            if concept.scale is not None:
                specs.append(ConceptSpec(concept.id, concept.text, float(concept.scale), concept.scale_source))
                continue
            # `scale: auto`: the adapter for this model and category predicts it in each call
            auto = concept.auto
            fingerprint = fingerprint or Fingerprint.of_pipeline(pipe)
            adapter = self._adapters.select(fingerprint, concept.category, concept.text)
            if adapter is not None:
                choices.append(AutoChoice.make(concept.id, adapter, policy_min=auto.min, policy_max=auto.max, fallback=auto.fallback))
                # a placeholder > 0 (a max of 0 drops the concept); each call overwrites it
                specs.append(ConceptSpec(concept.id, concept.text, float(auto.max), "adapter"))
                continue
            if snapshot.policy.on_missing_adapter == "error":
                raise PolicyError(
                    f"scale is 'auto' but no adapter for category {concept.category!r} fits this pipeline "
                    f"(searched: {', '.join(self._adapters.available()) or 'no adapters found'}; on_missing_adapter: error)",
                    file=snapshot.source,
                    place=f"concept {concept.id}",
                )
            specs.append(ConceptSpec(concept.id, concept.text, float(concept.auto.fallback), "fallback"))
        return specs, tuple(choices)

    @staticmethod
    def _report(
        snapshot: PolicySnapshot, plan: Plan, state: Any, compile_seconds: float, seconds: float, inference: Any = None
    ) -> GuardReport:
        measured = [state.first_step_attention[name] for name in plan.layer_names if name in state.first_step_attention] if state else []
        concepts = []
        token_scales = state.token_scales if state is not None else plan.token_scales  # adapters set them per call
        auto = inference.results if inference is not None else {}
        for row, (spec, positions) in enumerate(zip(plan.concepts, plan.token_positions)):
            scales = tuple(float(token_scales[row, p]) for p in positions)
            per_layer = tuple(float(layer[row, list(positions)].sum()) for layer in measured)
            used = auto.get(spec.id)
            source = spec.scale_source if used is None or not used.nonfinite else "adapter:nonfinite-rule"
            concepts.append(AppliedConcept(
                spec.id, spec.text, positions, scales, source, per_layer, adapter=used.adapter if used else None,
            ))
        return GuardReport(
            policy_name=snapshot.policy.name,
            policy_hash=snapshot.content_hash,
            pipeline_class=plan.family.pipeline_class,
            concepts=tuple(concepts),
            steps_inhibited=tuple(state.steps_inhibited) if state else (),
            total_steps=(state.total_steps or 0) if state else 0,
            step_window=(plan.window.start, plan.window.end),
            classifier_free_guidance=state.classifier_free_guidance if state else None,
            added_seconds=compile_seconds + (state.inhibitor_seconds if state else 0.0) + (inference.seconds if inference else 0.0),
            call_seconds=seconds,
            scale_inference_seconds=inference.seconds if inference else 0.0,
            feature_pass=inference.mode if inference is not None and inference.results else None,
        )


class GuardedPipeline:
    """``guard.wrap(pipe)``: called exactly like the pipeline; other attributes pass through."""

    def __init__(self, guard: Guard, pipe: Any) -> None:
        self._guard = guard
        self._pipe = pipe

    @property
    def guard(self) -> Guard:
        return self._guard

    @property
    def pipeline(self) -> Any:
        return self._pipe

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(self._pipe, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __repr__(self) -> str:
        return f"GuardedPipeline({type(self._pipe).__name__}, policy={self._guard.policy.policy.name!r})"
