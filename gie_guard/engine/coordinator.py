"""The coordinator of one guarded call: it installs the family's site handlers, keeps the
step clock, finds the prompt rows, makes each denoiser call's step context, records what
the sites report, checks the invariants and takes everything off again. It knows no site
kind and no family by name: those come from the plan's family.

Invariants, each a ``GuardedCallError`` that withholds the output when broken:

- the step clock counts denoising steps by the scheduler's ``step`` calls (clock.py); a run
  stopped from ``callback_on_step_end`` ends with a partial, reported result;
- in every denoiser call inside the window that carries prompt rows, every attention site
  reported an applied inhibitor; every such step had at least one such call; the
  denoiser's output is finite;
- every batch row matches the prompt or the negative prompt (rows.py);
- only processors a handler accepts run; processors other code installs mid-call are
  reported, never undone, and one no handler can guard fails the call.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import torch

from ..errors import GuardedCallError, UnsupportedPipelineError
from .clock import StepClock
from .context import CallShared, RideAlong, SiteText, StepContext, as_index
from .install import Installation
from .plan import Plan
from .record import CallRecord, MapObserver, ScaleSource
from .rows import PromptRows
from .sites import InstalledSite, Site, SiteHandler, SiteOutcome

__all__ = ["EngineCall"]

log = logging.getLogger("gie_guard.engine")


class EngineCall:
    """Installed machinery of one call. The only writer of the call's record and of each
    denoiser call's step context."""

    def __init__(
        self,
        pipe: Any,
        plan: Plan,
        *,
        scale_source: ScaleSource | None = None,
        observers: Sequence[MapObserver] = (),
        inhibit: bool = True,
    ) -> None:
        self.pipe = pipe
        self.plan = plan
        self.family = family = plan.family
        self.record = CallRecord(family=family.name, pipeline_class=type(pipe).__name__)
        self.scale_source = scale_source
        self.observers = tuple(observers)
        self.inhibit = inhibit
        self.thread = threading.get_ident()
        self.denoiser = family.denoiser(pipe)
        self.sites = family.sites(pipe)
        if tuple(s.name for s in self.sites) != plan.site_names:
            raise GuardedCallError(
                f"the attention layers of this {type(pipe).__name__} changed since its plan was compiled; "
                "the call was stopped (compile the plan again)"
            )
        self.aux = family.aux_sites(pipe) if plan.controlnet == "inhibit" else []
        self.handlers: dict[str, SiteHandler] = family.site_handlers()
        self._denoiser_name = "UNet" if family.denoiser_attr == "unet" else "transformer"
        self._device = _device_of(self.denoiser)
        self.scales = plan.token_scales.to(self._device) if plan.token_scales is not None else None
        self.clock = StepClock(pipe, plan.window, self.fail)
        self.rows = PromptRows(family, self.fail)
        self.installation = Installation()
        self.installed: list[InstalledSite] = []
        self.aux_installed: list[tuple[torch.nn.Module, list[InstalledSite]]] = []
        self._context: StepContext | None = None
        self._tokens: torch.Tensor | None = None  # joint families: the carried tokens (T_c, D), once per call
        self._outcomes: list[SiteOutcome] = []  # reported in the denoiser (or ControlNet) call in progress
        self._probing = False
        self._failure: GuardedCallError | None = None

    def fail(self, message: str) -> NoReturn:
        """Stop the call: the output is withheld."""
        error = GuardedCallError(f"{self.record.pipeline_class}: {message}; the output is withheld")
        self._failure = self._failure or error
        raise error

    # -- install -------------------------------------------------------------------------------
    def _handler(self, site: Site) -> SiteHandler:
        handler = self.handlers.get(site.kind)
        if handler is None:
            raise UnsupportedPipelineError(
                f"cannot guard attention layer {site.name} of {type(self.pipe).__name__}: the {self.family.name} family "
                f"supplies no handler for {site.kind!r} sites"
            )
        return handler

    def install(self) -> None:
        all_sites = (*self.sites, *(s for _, sites in self.aux for s in sites))
        for site in all_sites:
            reason = self._handler(site).refusal(site)
            if reason:
                raise UnsupportedPipelineError(
                    f"cannot guard attention layer {site.name} of {type(self.pipe).__name__}: {reason}")
        plan = self.plan
        shared = CallShared(
            plan=plan,
            site_text=self._site_text(plan.embeddings, plan.token_positions, whole=plan.sink != "prompt"),
            anchor_text=self._site_text(plan.anchor_embeddings, plan.anchor_positions, whole=False),
            reference_text=self._site_text(plan.reference_embeddings, plan.reference_positions,
                                           whole=plan.sink != "prompt"),
            _context=lambda: self._context,
            _fail=self.fail,
        )
        pipe, add = self.pipe, self.installation
        self.clock.install()
        add.patch(pipe, "encode_prompt", self.rows.wrap_encode(pipe.encode_prompt))
        add.patch(pipe.scheduler, "step", self._wrap_step(pipe.scheduler.step))
        add.hook(self.denoiser.register_forward_pre_hook(self._before_denoiser, with_kwargs=True),
                 self.denoiser.register_forward_hook(self._after_denoiser, with_kwargs=True))
        if self.family.joint and plan.text_states == "static":
            add.hook(*self.family.hold_concept_states(self.denoiser, self.sites, self._carried_span))  # type: ignore[attr-defined]
        for model, sites in self.aux:
            installed = [self._handler(s).install(s, shared, self._report) for s in sites]
            self.aux_installed.append((model, installed))
            add.hook(model.register_forward_pre_hook(self._before_aux, with_kwargs=True),
                     model.register_forward_hook(self._after_aux(sites), with_kwargs=True))
        self.installed = [self._handler(s).install(s, shared, self._report) for s in self.sites]

    def _site_text(self, embeddings: torch.Tensor | None, positions: Sequence[Sequence[int]], *,
                   whole: bool) -> SiteText | None:
        """Encodings as cross-attention layers receive text, over every slot (``whole``) or only
        the texts' own tokens (joint families carry theirs along instead). PixArt's 300-slot
        encodings through its caption projection and every site's key and value projections
        were most of its bookkeeping; the prompt sink reads only the own tokens."""
        if embeddings is None or self.family.joint:
            return None
        slots = tuple(range(embeddings.shape[1])) if whole else tuple(sorted({s for p in positions for s in p}))
        return SiteText(self.family.text_for_sites(self.denoiser, embeddings[:, list(slots)]), slots)

    def _carried_span(self) -> slice | None:
        ctx = self._context
        if ctx is None or ctx.ride is None or ctx.thread != threading.get_ident():
            return None
        return slice(ctx.ride.text_length, ctx.ride.text_length + ctx.ride.concept_length)

    def remove(self) -> None:
        for installed in (*self.installed, *(i for _, group in self.aux_installed for i in group)):
            if installed.state() != "ours":  # other code replaced the processor: theirs stays, the call says so
                self._foreign(installed)
            installed.remove()
        self.installation.remove()
        self.clock.restore()
        self._context = None

    def _foreign(self, installed: InstalledSite) -> None:
        note = f"{installed.site.name}: {installed.processor_name().rsplit('.', 1)[-1]}"
        if note not in self.record.foreign_changes:
            self.record.foreign_changes.append(note)
            log.warning("attention processor of %s changed by other code during a guarded call (now %s)",
                        installed.site.name, installed.processor_name())

    def _check_sites(self) -> None:
        for installed in (*self.installed, *(i for _, group in self.aux_installed for i in group)):
            state = installed.state()
            if state == "foreign":
                self._foreign(installed)
            elif state == "broken":
                self.fail(f"the processor of {installed.site.name} was replaced mid-call by "
                          f"{installed.processor_name()}, which gie_guard cannot reproduce")

    # -- what sites report ---------------------------------------------------------------------
    def _report(self, outcome: SiteOutcome) -> None:
        ctx = self._context
        self._outcomes.append(outcome)
        self.record.inhibitor_seconds += outcome.seconds
        if outcome.measured is not None:
            self.record.first_step_rows[outcome.site.name] = outcome.measured
            self.record.first_step_attention[outcome.site.name] = outcome.measured.mean(dim=0)
        if outcome.maps is not None and ctx is not None:
            for observer in self.observers:
                observer.on_maps(ctx.step, outcome.site, outcome.maps)

    def _missed(self, sites: Sequence[Site]) -> list[str]:
        applied = {id(o.site) for o in self._outcomes if o.inhibited}
        return [s.name for s in sites if id(s) not in applied]

    # -- the scheduler -------------------------------------------------------------------------
    def _wrap_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def scheduler_step(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            if threading.get_ident() == self.thread and not self._probing:
                self.clock.end_step(self._inhibits())
                self.record.steps_run = self.clock.step
            return out

        return scheduler_step

    def _inhibits(self) -> bool:
        return self.inhibit and self.scales is not None

    def _start_clock(self) -> None:
        if self.record.total_steps is None:
            self.clock.start()
            self.record.total_steps = self.clock.total
            self.record.window_widened = self.clock.widened
            self.record.classifier_free_guidance = self.clock.guidance

    # -- ControlNets ---------------------------------------------------------------------------
    def _before_aux(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A ControlNet's call in the step in progress: its prompt rows, inhibited as the step is."""
        if threading.get_ident() != self.thread or self._probing:
            return
        self._start_clock()
        rows = self.rows.of(args, kwargs)
        inhibit = bool(rows) and self.plan.concepts != () and self.clock.in_window() and self._inhibits()
        self._context = StepContext(step=self.clock.step, rows=as_index(rows), inhibit=inhibit, measure=False,
                                    observe=False, scales=self.scales, thread=self.thread)
        self._outcomes = []

    def _after_aux(self, sites: tuple[Site, ...]) -> Callable[..., None]:
        def after(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if threading.get_ident() != self.thread or self._probing:
                return
            ctx = self._context
            if ctx is not None and ctx.inhibit:
                missed = self._missed(sites)
                if missed:
                    self.fail(f"in step {self.clock.step} the inhibitor did not run in {len(missed)} ControlNet "
                              f"attention layer(s) ({', '.join(missed[:3])})")
            self._context = None

        return after

    # -- the denoiser --------------------------------------------------------------------------
    def _before_denoiser(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
        if threading.get_ident() != self.thread:
            return None  # another thread's (unguarded) call of a shared model: not ours
        if self._probing:
            ctx = self._context
            return self._ride_args(args, kwargs) if ctx is not None and ctx.ride is not None else None
        record = self.record
        self._start_clock()
        assert record.total_steps is not None
        if self.clock.step >= record.total_steps:
            self.fail(f"ran its {self._denoiser_name} {record.denoiser_calls + 1} times for {record.total_steps} "
                      "denoising steps (a call after the last step)")
        record.denoiser_calls += 1
        self._check_sites()
        first_of_step = self.clock.first_call_of_step()
        rows = self.rows.of(args, kwargs)
        if len(self.rows.layouts) != len(record.row_layouts):
            record.row_layouts = list(self.rows.layouts)
        wants = bool(rows) and self.plan.concepts != ()
        if first_of_step and self.scale_source is not None and wants:
            self._ask_scales(module, args, kwargs, rows)
        inhibit = wants and self.clock.in_window() and self._inhibits()
        joint = self.family.joint
        # A joint family measures only where its own attention runs anyway (an inhibited step,
        # a probe pass, an observe-only call): elsewhere the block's processor must run untouched.
        may_ride = inhibit or not self.inhibit or not joint or bool(self.observers)
        measure = wants and may_ride and self.clock.step == 0 and not record.first_step_attention
        observe = wants and may_ride and bool(self.observers)
        if inhibit:
            record.guarded_calls += 1
            self.clock.guarded()
        ride = joint and (inhibit or measure or observe)
        self._context = StepContext(
            step=self.clock.step, rows=as_index(rows), inhibit=inhibit, measure=measure, observe=observe,
            scales=self.scales, ride=self._ride_layout(args, kwargs) if ride else None, thread=self.thread,
        )
        self._outcomes = []
        return self._ride_args(args, kwargs) if ride else None

    def _ride_layout(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> RideAlong:
        text = self.family.denoiser_text(args, kwargs)
        if text is None:
            self.fail("its denoiser was called without text states")
        return RideAlong(text_length=int(text.shape[1]), concept_length=int(self._carried().shape[0]),
                         spans=tuple(self.plan.ride_along_spans))

    def _carried(self) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = self.plan.ride_along_tokens(self.denoiser)
        return self._tokens

    def _ride_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        # concepts', then anchors' carried tokens after the prompt's text
        return self.family.ride_along(args, kwargs, self._carried())

    def _after_denoiser(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if threading.get_ident() != self.thread or self._probing:
            return
        ctx = self._context
        if ctx is not None and ctx.inhibit:
            missed = self._missed(self.family.expected_sites(self.sites, kwargs))
            if missed:
                self.fail(f"in step {ctx.step} the inhibitor did not run in {len(missed)} attention layer(s) "
                          f"({', '.join(missed[:3])}{', ...' if len(missed) > 3 else ''}): their processor or "
                          "forward was changed or bypassed")
            sample = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
            if isinstance(sample, torch.Tensor) and not bool(torch.isfinite(sample).all()):
                self.fail(f"the guarded step {ctx.step} produced non-finite values (scale too large for this model?)")
            nonzero = [o.nonzero for o in self._outcomes if o.nonzero is not None]
            steps = self.record.steps_inhibited
            if nonzero and bool(torch.stack(nonzero).any()) and (not steps or steps[-1] != ctx.step):
                steps.append(ctx.step)
        self._context = None
        self._outcomes = []

    # -- scales --------------------------------------------------------------------------------
    def _ask_scales(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], rows: tuple[int, ...]) -> None:
        source = self.scale_source
        assert source is not None
        started = time.perf_counter()
        if self.clock.step == 0 and source.probe:
            self._probe(module, args, kwargs, rows)
        new = source.scales(self.clock.step, self.record if self.record.first_step_attention else None)
        if new is not None:
            self.scales = new.to(device=self._device, dtype=torch.float32)
        self.record.probe_seconds += time.perf_counter() - started

    def _probe(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], rows: tuple[int, ...]) -> None:
        """One extra denoiser evaluation of the prompt rows at step 0, measuring only."""
        batch = self.family.batch_size(args, kwargs)
        index = as_index(rows)
        p_args = tuple(_rows_of(a, index, batch) for a in args)
        p_kwargs = {k: v if k in self.family.shared_kwargs else _rows_of(v, index, batch) for k, v in kwargs.items()}
        ride = self._ride_layout(p_args, p_kwargs) if self.family.joint else None
        self._context = StepContext(step=0, rows=slice(0, len(rows)), inhibit=False, measure=True, observe=False,
                                    scales=self.scales, ride=ride, thread=self.thread)
        self._probing = True
        try:
            with torch.no_grad():
                module(*p_args, **p_kwargs)
        finally:
            self._probing = False
            self._context = None

    # -- a testing seam ------------------------------------------------------------------------
    @contextlib.contextmanager
    def layer_context(
        self, rows: Sequence[int], *, inhibit: bool = True, measure: bool = True, observe: bool = False,
        text_length: int | None = None, scales: torch.Tensor | None = None,
    ) -> Iterator[StepContext]:
        """Within the block, this thread's direct calls of the sites' attention layers run as in
        a denoiser call of step 0 whose prompt rows are ``rows`` (gie_guard.testing.reference).
        Joint families: the caller appends the carried tokens after ``text_length`` prompt tokens."""
        ride = None
        if self.family.joint:
            if text_length is None:
                raise ValueError("a joint family's layer context needs the prompt's text_length")
            spans = tuple(self.plan.ride_along_spans)
            ride = RideAlong(text_length=text_length, concept_length=spans[-1][1] if spans else 0, spans=spans)
        self._context = StepContext(step=0, rows=as_index(rows), inhibit=inhibit, measure=measure, observe=observe,
                                    scales=self.scales if scales is None else scales.to(self._device),
                                    ride=ride, thread=self.thread)
        try:
            yield self._context
        finally:
            self._context = None

    # -- end -----------------------------------------------------------------------------------
    def finish(self) -> None:
        """End-of-call invariants (only when the pipeline returned normally)."""
        record = self.record
        if self._failure is not None:
            raise self._failure
        if record.total_steps is None:
            self.fail(f"its {self._denoiser_name} never ran")
        assert record.total_steps is not None
        if record.steps_run < record.total_steps:
            if bool(getattr(self.pipe, "_interrupt", False)):
                record.interrupted = True
            else:
                self.fail(f"it ran {record.steps_run} of its {record.total_steps} denoising steps without being "
                          "interrupted")
        elif record.steps_run > record.total_steps:
            self.fail(f"ran {record.steps_run} denoising steps for {record.total_steps} announced")
        if self._inhibits() and not record.guarded_calls and not record.interrupted:
            self.fail("no denoising step was inhibited")


def _device_of(module: torch.nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def _rows_of(value: Any, index: slice | torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value[index.to(value.device) if isinstance(index, torch.Tensor) else index]
    if isinstance(value, dict):
        return {k: _rows_of(v, index, batch) for k, v in value.items()}
    return value
