"""Guard: the object an application holds. It owns the live policy, compiles it for each
pipeline it meets, and wraps every generator call in growth-inhibitor processors."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .engine import ConceptSpec, Plan, StepWindow, compile_plan, detect_family, installed
from .errors import GuardedCallError, GuardError, PolicyError
from .policy import PolicySnapshot, PolicyStore
from .report import AppliedConcept, GuardReport

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
    """

    def __init__(
        self,
        policy: Any = "nsfw",
        *,
        watch: bool = False,
        embedder: Any = None,
        on_report: Callable[[GuardReport], None] | None = None,
    ) -> None:
        self._store = PolicyStore(policy, watch=watch, embedder=embedder)
        self._on_report = on_report
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
        plan = compile_plan(pipe, self._concept_specs(snapshot), self._window(snapshot), clip_skip=clip_skip)
        with self._plans_lock:
            plans = self._plans.setdefault(pipe, {})
            for stale in [k for k in plans if k[0] != snapshot.content_hash]:
                del plans[stale]  # keep only the live policy's plans
            plans[key] = plan
        return plan, plan.compile_seconds

    def _guarded_call(self, pipe: Any, args: tuple, kwargs: dict) -> Any:
        started = time.perf_counter()
        family = detect_family(pipe)
        snapshot = self._store.current  # read once: a call never mixes two policies
        with _pipeline_lock(pipe):
            plan, compile_seconds = self._plan(pipe, snapshot, kwargs.get("clip_skip"))
            with installed(pipe, plan) as state:
                output = _unguarded_call(pipe)(*args, **kwargs)
        if state is not None and state.total_steps is not None and state.step + 1 != state.total_steps:
            raise GuardedCallError(
                f"{family.pipeline_class} ran its UNet {state.step + 1} times for {state.total_steps} "
                "denoising steps; the step window may not have been applied as configured, so the "
                "output is withheld"
            )
        report = self._report(snapshot, plan, state, compile_seconds, time.perf_counter() - started)
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
        return output

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _window(snapshot: PolicySnapshot) -> StepWindow:
        start, end = snapshot.policy.inhibit_steps
        return StepWindow(float(start), float(end))

    @staticmethod
    def _concept_specs(snapshot: PolicySnapshot) -> list[ConceptSpec]:
        specs = []
        for concept in snapshot.concepts:
            if concept.scale is not None:
                specs.append(ConceptSpec(concept.id, concept.text, float(concept.scale), concept.scale_source))
                continue
            # `scale: auto` needs an adapter for this model; none is wired in yet
            if snapshot.policy.on_missing_adapter == "error":
                raise PolicyError(
                    "scale is 'auto' but no adapter fits this pipeline (on_missing_adapter: error)",
                    file=snapshot.source,
                    place=f"concept {concept.id}",
                )
            specs.append(ConceptSpec(concept.id, concept.text, float(concept.auto.fallback), "fallback"))
        return specs

    @staticmethod
    def _report(snapshot: PolicySnapshot, plan: Plan, state: Any, compile_seconds: float, seconds: float) -> GuardReport:
        measured = [state.first_step_attention[name] for name in plan.layer_names if name in state.first_step_attention] if state else []
        concepts = []
        for row, (spec, positions) in enumerate(zip(plan.concepts, plan.token_positions)):
            scales = tuple(float(plan.token_scales[row, p]) for p in positions)
            per_layer = tuple(float(layer[row, list(positions)].sum()) for layer in measured)
            concepts.append(AppliedConcept(spec.id, spec.text, positions, scales, spec.scale_source, per_layer))
        return GuardReport(
            policy_name=snapshot.policy.name,
            policy_hash=snapshot.content_hash,
            pipeline_class=plan.family.pipeline_class,
            concepts=tuple(concepts),
            steps_inhibited=tuple(state.steps_inhibited) if state else (),
            total_steps=(state.total_steps or 0) if state else 0,
            step_window=(plan.window.start, plan.window.end),
            classifier_free_guidance=state.classifier_free_guidance if state else None,
            added_seconds=compile_seconds + (state.inhibitor_seconds if state else 0.0),
            call_seconds=seconds,
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
