"""Guard: the object an application holds. It owns the live policy, compiles it for each
pipeline it meets, and runs every generator call through the engine (gie_guard.engine)."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

from .adapters import AdapterLibrary, AdapterScales, AutoChoice, Fingerprint, check_feature_pass
from .engine import (
    CallRecord,
    ConceptSpec,
    Family,
    Plan,
    PresenceGate,
    StepWindow,
    compile_plan,
    denoiser_lock,
    family_for,
    guarded_call,
)
from .engine import ownership
from .engine.plan import MAPS
from .errors import ConfigurationError, ContentBlockedError, GuardError, PolicyError
from .logs import install_log_filters
from .metrics import GuardMetrics
from .plan_cache import DEFAULT_MAX_PLAN_BYTES, DEFAULT_MAX_PLANS, PlanCache, encoder_fingerprint
from .policy import PolicySnapshot, PolicyStore
from .report import AppliedConcept, GuardedOutput, GuardReport
from .verifiers import Verifier, check_verifiers, default_verifiers, run_verifiers

logger = logging.getLogger("gie_guard")

_SINKS = (None, "own", "prompt", "image")


def _unguarded_call(pipe: Any) -> Callable[..., Any]:
    """The pipeline's own ``__call__``, also while a guard is attached to it."""
    base = getattr(type(pipe), "_gie_guard_base", type(pipe))
    call: Callable[..., Any] = base.__call__.__get__(pipe)
    return call


def _compile_view(pipe: Any, family: Family) -> Any:
    """``pipe`` as a plan compile sees it: the same models, private copies of its tokenizers.
    Fast tokenizers keep padding and truncation settings as state, so a compile (on a reload's
    watcher thread) must never share one with code using the pipeline meanwhile (a guarded call,
    or a service counting prompt tokens). A shallow copy costs microseconds; a tokenizer copy
    tens of milliseconds (46 ms for the tiny pipelines' BERT tokenizer), once per compile."""
    view = copy.copy(pipe)
    for name in family.tokenizer_attrs:
        tokenizer = pipe.__dict__.get(name)
        if tokenizer is not None:
            object.__setattr__(view, name, copy.deepcopy(tokenizer))
    return view


class Guard:
    """Guard generator calls with a concept policy.

    ``policy`` is the name of a shipped policy (``"nsfw"``), a path to a YAML file, a
    :class:`~gie_guard.policy.Policy` or a plain dict. With ``watch=True`` the file is
    watched and reloaded when its content changes; a reload that would not work (invalid
    file, unknown verifier, a concept a served pipeline cannot encode) keeps the last good
    policy live. ``policy_roots``: folders a policy's ``include:`` may reach besides its own.

    Use it in one of these ways::

        images = guard(pipe, prompt="...").images         # one guarded call
        result = guard.generate(pipe, prompt="...")        # output and report together
        guarded = guard.wrap(pipe); guarded(prompt="...")  # called exactly like the pipeline
        with guard.attached(pipe): other_code(pipe)        # guard calls other code makes

    Every output carries its report as ``output.guard_report``; ``guard.last_report`` is the
    last report of the calling thread.

    ``scale: auto`` concepts get their scale from an adapter (docs/adapters.md): ``adapters``
    names extra folders, files or adapter objects; ``feature_pass`` is ``"auto"``,
    ``"probe"`` or ``"reuse"``. ``sink`` overrides what competes with a concept in its
    attention map, ``text_states`` and ``carry`` how a joint-attention family carries the
    concept's tokens (docs/families.md; the defaults are the measured choices).
    ``concept_map`` (``auto``, ``gie``, ``calibrated``, ``gated``, ``output``, ``contrast``)
    chooses how specific a concept's inhibition is, against ``references`` (default: a few
    neutral words; for ``contrast``, the neighbours to spare; docs/precision.md). ``preserve``
    (``auto``, ``compete``, ``project``, ``both``) and ``controlnet`` (``inhibit``, ``skip``) override the
    policy's ``preserve_by`` and ``controlnet`` keys (docs/policies.md) when given.

    Metrics go to ``metrics`` (a :class:`GuardMetrics`; default: the one on prometheus'
    global registry). ``verifiers`` adds or replaces verifiers by name for the policy's
    ``verify`` keys (docs/observability.md). ``on_report`` is called with every report; an
    exception it raises is logged and does not fail the (already guarded) call.

    ``exclusive`` (default True): a pipeline this guard wraps or attaches is *owned*: its
    denoiser and ControlNets run only inside guarded calls, whichever pipeline object or code
    calls them (``from_pipe``, ``**components``, copies, a hand-written loop); any other call
    raises ``UnguardedUseError`` until ``guard.release(pipe)``, the end of ``attached()``, or
    ``guard.close()``. ``exclusive=False`` leaves the raw pipeline usable beside the guarded one.

    Compiled plans are cached per pipeline and encoding settings, at most ``max_plans`` plans
    and ``max_plan_bytes`` bytes (least recently used out; docs/policies.md).
    """

    def __init__(
        self,
        policy: Any = "nsfw",
        *,
        watch: bool | Literal["poll"] = False,
        embedder: Any = None,
        on_report: Callable[[GuardReport], None] | None = None,
        registry: Any = None,
        metrics: GuardMetrics | None = None,
        verifiers: Mapping[str, Verifier] | None = None,
        adapters: Any = (),
        feature_pass: str = "auto",
        policy_roots: Any = (),
        sink: str | None = None,
        text_states: str = "ride-along",
        carry: str = "own",
        concept_map: str = "auto",
        references: Sequence[str] | None = None,
        preserve: str | None = None,
        controlnet: str | None = None,
        name: str | None = None,
        exclusive: bool = True,
        max_plans: int = DEFAULT_MAX_PLANS,
        max_plan_bytes: int = DEFAULT_MAX_PLAN_BYTES,
    ) -> None:
        install_log_filters()
        if sink not in _SINKS:
            raise ConfigurationError(f"sink must be one of own, prompt, image (or None), got {sink!r}")
        for key, value, allowed in (("preserve", preserve, (None, "auto", "compete", "project", "both", "centroid")),
                                    ("controlnet", controlnet, (None, "inhibit", "skip")),
                                    ("text_states", text_states, ("ride-along", "static")),
                                    ("carry", carry, ("own", "all")),
                                    ("concept_map", concept_map, ("auto", *MAPS))):
            if value not in allowed:
                raise ConfigurationError(f"{key} must be one of {', '.join(str(a) for a in allowed if a)}, got {value!r}")
        if on_report is not None and not callable(on_report):
            raise ConfigurationError("on_report must be callable")
        if not isinstance(exclusive, bool):
            raise ConfigurationError(f"exclusive must be True or False, got {exclusive!r}")
        if not (isinstance(max_plans, int) and max_plans >= 1 and isinstance(max_plan_bytes, int) and max_plan_bytes >= 1):
            raise ConfigurationError(f"max_plans and max_plan_bytes must be positive integers, got {max_plans!r}, "
                                     f"{max_plan_bytes!r}")
        self._sink = sink
        # measured choices of the engine (docs/families.md, docs/precision.md)
        if references is not None and (isinstance(references, str) or not all(
                isinstance(r, str) and r.strip() for r in references)):
            raise ConfigurationError(f"references must be a list of non-empty texts, got {references!r}")
        self._engine_options = {"text_states": text_states, "carry": carry, "concept_map": concept_map,
                                "references": None if references is None else tuple(references)}
        self._preserve = preserve  # None: the policy's preserve_by
        self._controlnet = controlnet  # None: the policy's controlnet
        self._adapters = adapters if isinstance(adapters, AdapterLibrary) else AdapterLibrary(adapters)
        self._feature_pass = check_feature_pass(feature_pass)
        self._verifiers = {**default_verifiers(), **(verifiers or {})}
        self._on_report = on_report
        self._local = threading.local()
        # compiled plans per pipeline, keyed by what they depend on
        self._plans = PlanCache(max_plans, max_plan_bytes)
        self._auto_choices: weakref.WeakKeyDictionary[Plan, tuple[AutoChoice, ...]] = weakref.WeakKeyDictionary()
        self._plans_lock = threading.Lock()
        self._served: weakref.WeakSet[Any] = weakref.WeakSet()  # pipelines a reload must compile for
        self._exclusive = exclusive
        self._owner = ownership.Owner(f"a Guard{f' {name!r}' if name else ''}")
        # pipelines this guard owns -> the models it claimed on them
        self._owned: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()
        self._owned_lock = threading.Lock()
        if metrics is not None and registry is not None:
            raise ConfigurationError("pass metrics= or registry=, not both")
        if metrics is None and registry is None:
            metrics = GuardMetrics.default()
        elif metrics is None:
            warnings.warn("Guard(registry=...) is deprecated: pass metrics=GuardMetrics(registry)",
                          DeprecationWarning, stacklevel=2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                metrics = GuardMetrics.for_registry(registry)  # shares the registry's object
        self._metrics = metrics
        # the store starts its watcher last; if anything after it fails, it is stopped
        self._store = PolicyStore(policy, watch=watch, embedder=embedder, roots=policy_roots, validate=self._validate)
        self._owner.label += f" (policy {self._store.current.name!r})"
        # a guard nobody holds any more (no wrapper refers to it) guards nothing: it owns nothing
        weakref.finalize(self, ownership.Owner.close, self._owner)
        try:
            self._metrics.track(self._store, guard=name, plans=self._plans)
        except BaseException:
            self._store.close()
            raise

    # -- policy -----------------------------------------------------------------------------
    @property
    def snapshot(self) -> PolicySnapshot:
        """The live policy snapshot."""
        return self._store.current

    @property
    def policy(self) -> PolicySnapshot:
        """The live policy snapshot (also ``guard.snapshot``)."""
        return self._store.current

    @property
    def store(self) -> PolicyStore:
        return self._store

    def reload(self) -> bool:
        """Re-read the policy source now. False (and the last good policy stays live) when
        the new content is invalid or would not work on a pipeline this guard serves."""
        return self._store.reload()

    def close(self) -> None:
        """Stop watching the policy file and release every pipeline this guard owns."""
        self._owner.close()  # copies of owned models, too, are free of this guard now
        with self._owned_lock:
            owned = [(pipe, list(models)) for pipe, models in self._owned.items()]
            self._owned.clear()
        for _, models in owned:
            for model in models:
                ownership.release(model, self._owner)
        self._store.close()
        with contextlib.suppress(Exception):
            self._metrics.untrack(self._store)

    # -- ownership ----------------------------------------------------------------------------
    def owns(self, pipe: Any) -> bool:
        """Whether this guard owns ``pipe``'s denoiser (``wrap`` or ``attached`` with exclusive)."""
        pipe = _unwrapped(pipe)
        return any(self._owner in ownership.owners_of(m) for m in family_for(pipe).owned_models(pipe))

    def release(self, pipe: Any) -> None:
        """Give ``pipe``'s denoiser and ControlNets back: raw calls of them work again (the
        wrapper, if any, stays guarded)."""
        pipe = _unwrapped(pipe)
        with self._owned_lock:
            models = list(self._owned.pop(pipe, ()))
        with contextlib.suppress(GuardError):
            models += family_for(pipe).owned_models(pipe)
        for model in models:
            ownership.release(model, self._owner)

    def _take(self, pipe: Any) -> None:
        """Own ``pipe``'s models (again: a denoiser swapped in since is claimed too)."""
        if self._owner.closed:
            raise GuardError("this Guard is closed: it cannot take a pipeline (make a new Guard)")
        models = family_for(pipe).owned_models(pipe)
        with self._owned_lock:
            claimed = self._owned.setdefault(pipe, weakref.WeakSet())
            for model in models:
                if model not in claimed or self._owner not in ownership.owners_of(model):
                    ownership.own(model, self._owner)
                    claimed.add(model)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _validate(self, snapshot: PolicySnapshot) -> None:
        """Everything a generation will need from this snapshot, checked before it goes live:
        its verifiers exist, and every concept encodes on every pipeline already served (the
        plans are compiled now, so the first call after a reload does not pay for it)."""
        check_verifiers(snapshot, self._verifiers)
        for pipe in list(self._served):
            try:
                self._plan(pipe, snapshot, {})
            except GuardError as exc:
                raise PolicyError(
                    f"does not work on a served {type(pipe).__name__}: {exc}", file=snapshot.source, place="concepts"
                ) from exc

    @property
    def last_report(self) -> GuardReport | None:
        """The report of this thread's last guarded call (``output.guard_report`` works across threads)."""
        return getattr(self._local, "report", None)

    @property
    def metrics(self) -> GuardMetrics:
        return self._metrics

    # -- calls ------------------------------------------------------------------------------
    def __call__(self, pipe: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``pipe(*args, **kwargs)`` guarded, and return the pipeline's usual output
        (with ``guard_report`` attached where the output takes attributes)."""
        return self._guarded_call(pipe, args, kwargs).output

    def generate(self, pipe: Any, *args: Any, **kwargs: Any) -> GuardedOutput:
        """Like calling the guard, but returns the output and its report together."""
        return self._guarded_call(pipe, args, kwargs)

    def wrap(self, pipe: Any, *, exclusive: bool | None = None) -> GuardedPipeline:
        """An object called exactly like ``pipe``; every call is guarded, and methods that
        return the pipeline (``.to()``, ``.half()``, ``from_pipe``) return a wrapper. With
        ``exclusive`` (default: the guard's), the guard owns ``pipe``'s denoiser (see Guard)."""
        pipe = _unwrapped(pipe)
        family_for(pipe)
        if self._exclusive if exclusive is None else exclusive:
            self._take(pipe)
        return GuardedPipeline(self, pipe)

    @contextlib.contextmanager
    def attached(self, pipe: Any, *, exclusive: bool | None = None) -> Iterator[Any]:
        """Within the block, every call of ``pipe`` (by any code) is guarded; with
        ``exclusive`` (default: the guard's) any other use of its denoiser is refused."""
        family_for(pipe)
        cls = type(pipe)
        if hasattr(cls, "_gie_guard_base"):
            raise GuardError(f"a guard is already attached to this {cls._gie_guard_base.__name__}")
        guard = self
        take = (self._exclusive if exclusive is None else exclusive) and not self.owns(pipe)
        if take:
            self._take(pipe)

        def guarded_call(self_pipe: Any, *args: Any, **kwargs: Any) -> Any:
            return guard._guarded_call(self_pipe, args, kwargs).output

        # A subclass whose __call__ is guarded: `pipe(...)` looks __call__ up on the type. Copies
        # made meanwhile keep this class, so they stay guarded after the block.
        pipe.__class__ = type(cls.__name__, (cls,), {
            "__call__": guarded_call, "_gie_guard_base": cls, "_gie_guard": self,
            "__copy__": _copy_instance, "__deepcopy__": _deepcopy_instance, "__reduce_ex__": _refuse_pickle,
        })
        try:
            yield pipe
        finally:
            pipe.__class__ = cls
            if take:
                self.release(pipe)

    def plan_for(self, pipe: Any, snapshot: PolicySnapshot | None = None, **call: Any) -> Plan:
        """The compiled plan of ``snapshot`` (default: the live policy) for ``pipe`` called with
        ``call``'s keyword arguments (those that change encodings: clip_skip, max_sequence_length...); cached."""
        return self._plan(pipe, snapshot or self._store.current, call)[0]

    def _plan(self, pipe: Any, snapshot: PolicySnapshot, kwargs: Mapping[str, Any]) -> tuple[Plan, float]:
        """The cached plan, and the seconds spent compiling it now (0 when it was cached)."""
        family = family_for(pipe)
        options = family.encoding_options(pipe, dict(kwargs))
        key = (snapshot.content_hash, tuple(sorted(options.items())), self._sink, id(family.denoiser(pipe)),
               encoder_fingerprint(pipe, kwargs, family))
        plan = self._plans.get(pipe, key)
        if plan is not None:
            return plan, 0.0
        specs, choices = self._concept_specs(snapshot, pipe)
        # Encoding runs tokenizers, whose padding settings are shared state: compiles use private
        # copies, and never run beside a guarded call on the same denoiser (a reload compiles from
        # the watcher thread; a LoRA scale is applied to the text encoder while it encodes).
        with denoiser_lock(family.denoiser(pipe)):
            plan = compile_plan(_compile_view(pipe, family), specs, self._window(snapshot), options=options, family=family, sink=self._sink,  # type: ignore[arg-type]
                                preserve=self._preserve or snapshot.policy.preserve_by,  # type: ignore[arg-type]
                                controlnet=self._controlnet or snapshot.policy.controlnet,  # type: ignore[arg-type]
                                **self._engine_options)  # type: ignore[arg-type]
        with self._plans_lock:
            self._auto_choices[plan] = choices
        live = self._store.current.content_hash if hasattr(self, "_store") else snapshot.content_hash
        # keep the live policy's plans (and a candidate's)
        self._plans.put(pipe, key, plan, keep=lambda k: k[0] in (snapshot.content_hash, live))
        return plan, plan.compile_seconds

    def _guarded_call(self, pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> GuardedOutput:
        install_log_filters()  # loggers diffusers created since the last call (one len() otherwise)
        snapshot = self._store.current  # read once: a call never mixes two policies
        if type(pipe) is GuardedPipeline:
            if object.__getattribute__(pipe, "_guard") is not self:
                raise GuardError(
                    f"this {type(_unwrapped(pipe)).__name__} is wrapped by another Guard; one guard guards a call: "
                    "call the wrapper, or put both policies in one (include:) — nothing was generated"
                )
            pipe = _unwrapped(pipe)
        attached = getattr(type(pipe), "_gie_guard", None)
        if attached is not None and attached is not self:
            raise GuardError(
                f"this {type(pipe).__name__} is attached to another Guard (policy {attached.snapshot.name!r}); "
                "one guard guards a call: call pipe(...) to use the attached one, or put both policies in one "
                "(include:) — nothing was generated"
            )
        # counted once, by how the call ends: its verification's outcome, `blocked`, or `error`
        with self._metrics.generation(snapshot.name) as generation:
            result = self._run(snapshot, pipe, args, kwargs, generation)
        self._local.report = result.report
        if self._on_report is not None:
            try:
                self._on_report(result.report)
            except Exception:
                logger.exception("on_report callback %r failed; the guarded output is returned", self._on_report)
        return result

    def _run(self, snapshot: PolicySnapshot, pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any], generation: Any) -> GuardedOutput:
        started = time.perf_counter()
        if pipe in self._owned:
            self._take(pipe)  # a denoiser or ControlNet swapped in since wrap() is owned too
        plan, compile_seconds = self._plan(pipe, snapshot, kwargs)
        self._served.add(pipe)
        choices = self._auto_choices.get(plan, ())
        source: Any = AdapterScales(plan, choices, self._feature_pass) if choices and not plan.is_empty else None
        adapters = source
        presence = {c.id: c.presence for c in snapshot.concepts}  # O(C): plans may hold 1,000 concepts
        gated = [presence[spec.id] for spec in plan.concepts]
        gate: PresenceGate | None = None
        if not plan.is_empty and any(p.mode != "off" for p in gated):
            # concepts not gated keep factor 1 whatever mode is listed for them
            gate = source = PresenceGate(plan, [p.threshold if p.mode != "off" else None for p in gated],
                                         mode=[p.mode if p.mode != "off" else "gate" for p in gated],
                                         base=adapters)
        with guarded_call(pipe, plan, scale_source=source) as record:
            output = _unguarded_call(pipe)(*args, **kwargs)
        report = self._report(snapshot, plan, record, compile_seconds, time.perf_counter() - started, adapters, gate)
        output, verification = run_verifiers(snapshot, output, self._verifiers)
        generation.observe(report, verification)
        _attach(output, report)
        logger.debug(
            "guarded call: policy=%s family=%s concepts=%s steps=%d/%d added=%.4fs",
            report.policy_name, report.family, ",".join(report.concept_ids), len(report.steps_inhibited),
            report.total_steps, report.added_seconds,
        )
        if verification is not None and verification.action == "block":
            raise ContentBlockedError(report, verification)
        return GuardedOutput(output, report, verification)

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
                specs.append(ConceptSpec(concept.id, concept.text, float(concept.scale), concept.scale_source, concept.anchors))
                continue
            # `scale: auto`: the adapter for this model and category predicts it in each call
            auto = concept.auto
            assert auto is not None
            fingerprint = fingerprint or Fingerprint.of_pipeline(pipe)
            adapter = self._adapters.select(fingerprint, concept.category, concept.text)
            if adapter is not None:
                choices.append(AutoChoice.make(concept.id, adapter, policy_min=auto.min, policy_max=auto.max, fallback=auto.fallback))
                # a placeholder > 0 (a max of 0 drops the concept); each call overwrites it
                specs.append(ConceptSpec(concept.id, concept.text, float(auto.max), "adapter", concept.anchors))
                continue
            if snapshot.policy.on_missing_adapter == "error":
                raise PolicyError(
                    f"scale is 'auto' but no adapter for category {concept.category!r} fits this pipeline "
                    f"(searched: {', '.join(self._adapters.available()) or 'no adapters found'}; on_missing_adapter: error)",
                    file=snapshot.source,
                    place=f"concept {concept.id}",
                )
            specs.append(ConceptSpec(concept.id, concept.text, float(auto.fallback), "fallback", concept.anchors))
        return specs, tuple(choices)

    @staticmethod
    def _report(
        snapshot: PolicySnapshot, plan: Plan, record: CallRecord, compile_seconds: float, seconds: float,
        source: AdapterScales | None, gate: PresenceGate | None,
    ) -> GuardReport:
        measured = [record.first_step_attention[n] for n in plan.layer_names if n in record.first_step_attention]
        scales = source.current if source is not None else plan.token_scales  # adapters set them per call
        scales = scales[0] if scales is not None and scales.ndim == 3 else scales  # per-row scales: the first row's
        auto = source.results if source is not None else {}
        concepts = []
        for row, (spec, positions) in enumerate(zip(plan.concepts, plan.token_positions)):
            used = auto.get(spec.id)
            source_name = spec.scale_source if used is None or not used.nonfinite else "adapter:nonfinite-rule"
            concepts.append(AppliedConcept(
                spec.id, spec.text, positions,
                tuple(float(scales[row, p]) for p in positions) if scales is not None else (),
                source_name,
                tuple(float(layer[row, list(positions)].sum()) for layer in measured),
                adapter=used.adapter if used else None,
                presence=_column(gate.measured_presence if gate is not None else None, row),
                gate=_column(gate.factor if gate is not None else None, row),
            ))
        inference = (source.seconds + record.probe_seconds) if source is not None else 0.0
        return GuardReport(
            policy_name=snapshot.policy.name,
            policy_hash=snapshot.content_hash,
            pipeline_class=record.pipeline_class,
            concepts=tuple(concepts),
            steps_inhibited=tuple(record.steps_inhibited),
            total_steps=record.total_steps or 0,
            step_window=(plan.window.start, plan.window.end),
            classifier_free_guidance=record.classifier_free_guidance,
            added_seconds=compile_seconds + record.inhibitor_seconds + inference,
            call_seconds=seconds,
            scale_inference_seconds=inference,
            feature_pass=source.mode if source is not None and source.results else None,
            family=record.family,
            sink=plan.sink,
            rows_guarded=tuple(record.row_layouts),
            steps_run=record.steps_run,
            interrupted=record.interrupted,
            window_widened=record.window_widened,
            denoiser_calls=record.denoiser_calls,
            processor_changes=tuple(record.foreign_changes),
        )


def _unwrapped(pipe: Any) -> Any:
    return object.__getattribute__(pipe, "_pipe") if type(pipe) is GuardedPipeline else pipe


def _copy_instance(self: Any) -> Any:
    new = object.__new__(type(self))
    new.__dict__.update(self.__dict__)
    return new


def _deepcopy_instance(self: Any, memo: dict[int, Any]) -> Any:
    new = object.__new__(type(self))
    memo[id(self)] = new
    new.__dict__.update(copy.deepcopy(self.__dict__, memo))
    return new


def _refuse_pickle(self: Any, protocol: Any) -> Any:
    raise GuardError(
        "a guarded pipeline cannot be pickled (its guard holds threads, locks and metrics): pickle or "
        "save the pipeline itself and wrap it again with a Guard where it is loaded"
    )


def _column(values: Any, row: int) -> tuple[float, ...]:
    """Column ``row`` of a ``(images, C)`` tensor as floats; () when there is none."""
    return () if values is None else tuple(float(v) for v in values[:, row])


def _attach(output: Any, report: GuardReport) -> None:
    """Put the report on the pipeline's output where it takes attributes (not on tuples)."""
    if isinstance(output, tuple):
        return
    with contextlib.suppress(AttributeError, TypeError):
        object.__setattr__(output, "guard_report", report)


class GuardedPipeline:
    """``guard.wrap(pipe)``: called exactly like the pipeline; other attributes pass through,
    and a method that returns the pipeline itself returns this wrapper instead."""

    __slots__ = ("_guard", "_pipe")

    def __init__(self, guard: Guard, pipe: Any) -> None:
        object.__setattr__(self, "_guard", guard)
        object.__setattr__(self, "_pipe", pipe)

    @property
    def guard(self) -> Guard:
        guard: Guard = self._guard
        return guard

    @property
    def pipeline(self) -> Any:
        return self._pipe

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(self._pipe, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> GuardedOutput:
        guard: Guard = self._guard
        return guard.generate(self._pipe, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._pipe, name)
        if inspect.ismethod(value) and value.__self__ is self._pipe:
            return self._keep_wrapped(value)
        return value

    def _keep_wrapped(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            return self if result is self._pipe else result

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._pipe, name, value)

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """The pipeline's class, so ``isinstance`` and ``AutoPipeline*.from_pipe(wrapped)`` see
        the pipeline (``type(wrapped)`` is still GuardedPipeline)."""
        return type(self._pipe)

    def from_pipe(self, pipeline: Any = None, **kwargs: Any) -> GuardedPipeline:
        """``PipelineClass.from_pipe`` of this pipeline's class (default: from this pipeline),
        returned wrapped by the same guard (and owned by it where this one is)."""
        source = _unwrapped(pipeline) if pipeline is not None else self._pipe
        base = getattr(type(self._pipe), "_gie_guard_base", type(self._pipe))
        made = base.from_pipe(source, **kwargs)
        guard: Guard = self._guard
        return guard.wrap(made, exclusive=guard.owns(self._pipe))

    def __copy__(self) -> GuardedPipeline:
        """The same pipeline, wrapped by the same guard."""
        return GuardedPipeline(self._guard, self._pipe)

    def __deepcopy__(self, memo: dict[int, Any]) -> GuardedPipeline:
        """A deep copy of the pipeline, wrapped (and owned, where this one is) by the same guard."""
        guard: Guard = self._guard
        pipe = copy.deepcopy(self._pipe, memo)
        return guard.wrap(pipe, exclusive=guard.owns(self._pipe))

    def __reduce_ex__(self, protocol: Any) -> Any:
        _refuse_pickle(self, protocol)

    def __repr__(self) -> str:
        return f"GuardedPipeline({type(self._pipe).__name__}, policy={self._guard.snapshot.name!r})"
