"""One guarded call: install a plan on a pipeline, keep the step clock, check the
invariants, and take everything off again.

The engine, and only the engine, writes the state of a call. Scale sources (adapters)
answer when asked for scales; observers (reports, pictures) receive what was measured.

Invariants, each a ``GuardedCallError`` that withholds the output when broken:

- calls are serialised per denoiser (and scheduler), not per pipeline object, so pipelines
  that share a UNet (``from_pipe``, ``**pipe.components``) never overlap;
- the step clock counts denoising steps by the scheduler's ``step`` calls, so a step is one
  step however many times the denoiser runs in it (SD3 skip-layer guidance, Flux true CFG);
  a run stopped from ``callback_on_step_end`` ends with a partial, reported result;
- in every denoiser call inside the window that carries prompt rows, every attention site
  applied the inhibitor; every such step had at least one such call; the denoiser's output
  is finite;
- the rows that carry the prompt are found by comparing each batch row with what the
  pipeline's ``encode_prompt`` returned: a row that matches neither prompt nor negative
  prompt fails the call;
- only processors of known classes run (class identity); processors other code installs
  mid-call are reported, never undone, and one the engine cannot reproduce fails the call.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import torch

from ..errors import GuardedCallError, UnsupportedPipelineError
from . import ownership
from .cross import CrossSite, accepted
from .families import family_for
from .families.base import Site
from .joint import JointInhibitorProcessor, joint_processor_classes
from .plan import Plan

__all__ = ["CallRecord", "EngineCall", "MapObserver", "ScaleSource", "denoiser_lock", "guarded_call", "observing"]

log = logging.getLogger("gie_guard.engine")


class ScaleSource(Protocol):
    """Supplies a call's token scales (adapters, presence gating). ``probe``: measure step 0
    unsuppressed in an extra denoiser pass before it runs. ``scales`` is asked at the start of
    every step with the call's record once the first step is measured (its
    ``first_step_attention`` and per-row ``first_step_rows``); it returns ``(C, T)`` or per
    image ``(rows, C, T)`` scales, or None to keep the current ones."""

    probe: bool

    def scales(self, step: int, measured: CallRecord | None) -> torch.Tensor | None: ...


class MapObserver(Protocol):
    """Receives, at every step and attention site, each concept's map summed over its own
    tokens: a list (one per concept) of ``(rows, heads, N)`` float32 tensors, N the image
    positions of the site (pictures: gie_guard.explain)."""

    def on_maps(self, step: int, site: Site, shares: list[torch.Tensor]) -> None: ...


@dataclass
class CallRecord:
    """What the engine did in one call (the report is built from it)."""

    family: str
    pipeline_class: str
    total_steps: int | None = None
    steps_run: int = 0
    steps_inhibited: list[int] = field(default_factory=list)
    interrupted: bool = False
    window_widened: bool = False
    denoiser_calls: int = 0
    guarded_calls: int = 0  # denoiser calls in the window that carried prompt rows
    row_layouts: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (batch, prompt rows) seen
    classifier_free_guidance: bool | None = None
    first_step_attention: dict[str, torch.Tensor] = field(default_factory=dict)  # site -> (C, T), mean over rows
    first_step_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # site -> (rows, C, T)
    foreign_changes: list[str] = field(default_factory=list)
    inhibitor_seconds: float = 0.0
    probe_seconds: float = 0.0


_MISSING = object()

# -- locks ------------------------------------------------------------------------------------

_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_OBSERVERS: weakref.WeakKeyDictionary[Any, list[MapObserver]] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_ACTIVE: weakref.WeakKeyDictionary[Any, EngineCall] = weakref.WeakKeyDictionary()


def denoiser_lock(obj: Any) -> threading.RLock:
    """The lock of a denoiser (or scheduler): one guarded call at a time uses it."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(obj)
        if lock is None:
            lock = _LOCKS[obj] = threading.RLock()
        return lock


@contextlib.contextmanager
def _locked(objs: Sequence[Any]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for obj in sorted({id(o): o for o in objs if o is not None}.values(), key=id):  # one global order
            stack.enter_context(denoiser_lock(obj))
        yield


# -- the call ---------------------------------------------------------------------------------


class EngineCall:
    """Installed machinery of one call; read by sites and processors, written only here."""

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
        self.family = plan.family
        self.record = CallRecord(family=plan.family.name, pipeline_class=type(pipe).__name__)
        self.scale_source = scale_source
        self.observers = tuple(observers)
        self.inhibit = inhibit
        self.sink = plan.sink
        self.thread = threading.get_ident()
        self.denoiser = plan.family.denoiser(pipe)
        sites = plan.family.sites(pipe)
        if tuple(s.name for s in sites) != plan.site_names:
            raise GuardedCallError(
                f"the attention layers of this {type(pipe).__name__} changed since its plan was compiled; "
                "the call was stopped (compile the plan again)"
            )
        self.sites = sites
        from .families.unet import unet_sites  # cross-attention of the auxiliary models (ControlNets)

        self.aux: list[tuple[torch.nn.Module, tuple[Site, ...]]] = [
            (model, tuple(Site(f"{prefix}.{s.name}", s.module, s.kind) for s in unet_sites(model)))
            for prefix, model in (plan.family.aux_models(pipe) if plan.controlnet == "inhibit" else [])
        ]
        self._denoiser_name = "UNet" if plan.family.denoiser_attr == "unet" else "transformer"
        # per call: scales on the denoiser's device; state of the step in progress
        self._device = _device_of(self.denoiser)
        self.scales = plan.token_scales.to(self._device) if plan.token_scales is not None else None
        self.step = 0  # index of the step in progress (completed scheduler steps)
        self.active = False  # inhibit in the denoiser call in progress
        self.measuring = False  # measure first-step attention in the call in progress
        self.observing = False
        self.rows: slice | torch.Tensor = slice(0, 0)
        self.text_length = 0  # joint families: prompt text tokens, and the concept tokens after them
        self.concept_length = 0
        self.concept_spans: list[tuple[int, int]] = []
        self._riding = False
        self._prompt: list[torch.Tensor] = []
        self._negative: list[torch.Tensor] = []
        self._encode_calls = 0
        self._rows_cache: dict[tuple[int, int, int], tuple[int, ...]] = {}
        self._window_steps: set[int] = set()
        self._step_started = -1
        self._step_guarded = False
        self._probing = False
        self._cross: list[CrossSite] = []
        self._joint: list[tuple[Site, Any, JointInhibitorProcessor]] = []
        self._processors: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._patched: list[tuple[Any, str]] = []
        self._failure: GuardedCallError | None = None
        self._site_text: torch.Tensor | None = None
        self._nonzero: list[torch.Tensor] = []  # per site application in the denoiser call: any value != 0
        self._anchor_text: torch.Tensor | None = None

    # -- read by sites -------------------------------------------------------------------------
    def wants_query(self, site: Site) -> bool:
        return threading.get_ident() == self.thread and (self.active or self.measuring or self.observing)

    def riding(self, site: Site) -> bool:
        return threading.get_ident() == self.thread and self._riding

    def site_text(self, *, anchors: bool = False) -> torch.Tensor:
        """Concept (or anchor) encodings as the attention sites receive text."""
        if anchors:
            if self._anchor_text is None:
                assert self.plan.anchor_embeddings is not None  # asked for only when the plan has anchors
                self._anchor_text = self.family.text_for_sites(self.denoiser, self.plan.anchor_embeddings)
            return self._anchor_text
        if self._site_text is None:
            assert self.plan.embeddings is not None  # sites run only when the plan has concepts
            self._site_text = self.family.text_for_sites(self.denoiser, self.plan.embeddings)
        return self._site_text

    def scales_for(self, rows: int) -> torch.Tensor:
        """The scales for a call guarding ``rows`` rows: ``(C, T)``, or per image ``(rows, C, T)``
        (per-image scales repeat over chunks of prompt rows, as PAG's perturbed copy)."""
        assert self.scales is not None
        if self.scales.ndim == 3 and self.scales.shape[0] != rows:
            if rows % self.scales.shape[0]:
                self.fail(f"per-image scales for {self.scales.shape[0]} rows, but the call guards {rows}")
            return self.scales.repeat(rows // self.scales.shape[0], 1, 1)
        return self.scales

    def to_plan_slots(self, values: Sequence[torch.Tensor], slots: Sequence[Sequence[int]]) -> torch.Tensor:
        """Per-concept ``(..., T_c)`` values over some slots -> ``(..., C, T)`` over the plan's slots (0 elsewhere)."""
        assert self.plan.token_scales is not None
        lead = values[0].shape[:-1] if values else ()
        out = torch.zeros(*lead, *self.plan.token_scales.shape, dtype=torch.float32)
        for c, (m, s) in enumerate(zip(values, slots)):
            out[..., c, list(s)] = m.float().cpu()
        return out

    def measured(self, site: Site, rows: torch.Tensor) -> None:
        """The first step's maps at ``site``: ``(rows, C, T)`` means over heads and positions."""
        self.record.first_step_rows[site.name] = rows.float().cpu()
        self.record.first_step_attention[site.name] = rows.float().mean(dim=0).cpu()

    def observe(self, site: Site, maps: Any) -> None:
        for observer in self.observers:
            observer.on_maps(self.step, site, maps)

    def subtracted(self, delta: torch.Tensor) -> None:
        """A site subtracted ``delta`` (in the output's dtype): a step counts as inhibited only
        where some subtracted value was non-zero (a scale float16 flushes to zero is no inhibition).
        Kept on the device; read once per denoiser call."""
        self._nonzero.append(delta.ne(0).any())

    def add_seconds(self, seconds: float) -> None:
        self.record.inhibitor_seconds += seconds

    def fail(self, message: str) -> NoReturn:
        """Stop the call: the output is withheld."""
        error = GuardedCallError(f"{self.record.pipeline_class}: {message}; the output is withheld")
        self._failure = self._failure or error
        raise error

    # -- install -------------------------------------------------------------------------------
    def install(self) -> None:
        self._check_processors(initial=True)
        pipe = self.pipe
        # a step count left by an earlier call must not pass for this call's
        self._stale_steps = pipe.__dict__.get("_num_timesteps", _MISSING)
        if self._stale_steps is not _MISSING:
            pipe.__dict__["_num_timesteps"] = None
        self._patch(pipe, "encode_prompt", self._wrap_encode(pipe.encode_prompt))
        self._patch(pipe.scheduler, "step", self._wrap_step(pipe.scheduler.step))
        self._handles.append(self.denoiser.register_forward_pre_hook(self._before_denoiser, with_kwargs=True))
        self._handles.append(self.denoiser.register_forward_hook(self._after_denoiser, with_kwargs=True))
        if self.family.joint and self.plan.text_states == "static":
            self._hold_concept_states()
        for model, sites in self.aux:
            self._handles.append(model.register_forward_pre_hook(self._before_aux, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._after_aux(sites), with_kwargs=True))
            for site in sites:
                hooks = CrossSite(site, self, -1)
                hooks.install()
                self._cross.append(hooks)
        for row, site in enumerate(self.sites):
            if site.kind == "cross":
                hooks = CrossSite(site, self, row)
                hooks.install()
                self._cross.append(hooks)
            else:
                original = site.module.processor
                processor = JointInhibitorProcessor(original, site, self, row, text_first=self.family.text_first)
                site.module.set_processor(processor)
                self._joint.append((site, original, processor))

    def _hold_concept_states(self) -> None:
        """The "static" baseline: every block sees the concept tokens as they entered the first."""
        blocks = list(dict.fromkeys(self.denoiser.get_submodule(s.name.rsplit(".", 1)[0]) for s in self.sites))
        held: dict[str, torch.Tensor] = {}

        def span() -> slice:
            return slice(self.text_length, self.text_length + self.concept_length)

        def first(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._riding and threading.get_ident() == self.thread:
                held["tokens"] = kwargs["encoder_hidden_states"][:, span()].clone()

        def after(_module: Any, _args: tuple[Any, ...], _kwargs: dict[str, Any], output: Any) -> None:
            if self._riding and threading.get_ident() == self.thread and output[0] is not None:
                output[0][:, span()] = held["tokens"]

        self._handles.append(blocks[0].register_forward_pre_hook(first, with_kwargs=True))
        for block in blocks:
            self._handles.append(block.register_forward_hook(after, with_kwargs=True))

    def _patch(self, obj: Any, name: str, value: Any) -> None:
        object.__setattr__(obj, name, value) if not isinstance(obj, torch.nn.Module) else setattr(obj, name, value)
        self._patched.append((obj, name))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for hooks in self._cross:
            hooks.remove()
        if getattr(self, "_stale_steps", _MISSING) is not _MISSING and self.pipe.__dict__.get("_num_timesteps") is None:
            self.pipe.__dict__["_num_timesteps"] = self._stale_steps
        for obj, name in reversed(self._patched):
            with contextlib.suppress(AttributeError):
                object.__delattr__(obj, name)
        self._patched.clear()
        for site, original, processor in self._joint:
            if site.module.processor is processor:
                site.module.set_processor(original)
            else:  # other code replaced our processor: theirs stays, and the call says so
                self._foreign(site, site.module.processor)
        for site in self.sites:
            if site.kind == "cross" and site.module.processor is not self._processors.get(site.name):
                self._foreign(site, site.module.processor)

    def _foreign(self, site: Site, processor: Any) -> None:
        note = f"{site.name}: {type(processor).__name__}"
        if note not in self.record.foreign_changes:
            self.record.foreign_changes.append(note)
            log.warning("attention processor of %s changed by other code during a guarded call (now %s)",
                        site.name, type(processor).__name__)

    def _check_processors(self, *, initial: bool) -> None:
        joint = joint_processor_classes()
        for site in (*self.sites, *(s for _, sites in self.aux for s in sites)):
            processor = site.module.processor
            if site.kind == "cross":
                ok = accepted(processor) is not None
                if initial:
                    self._processors[site.name] = processor
                elif processor is not self._processors.get(site.name):
                    self._foreign(site, processor)
            else:
                ok = type(processor) in joint if initial else isinstance(processor, JointInhibitorProcessor)
            if ok:
                continue
            what = f"{type(processor).__module__}.{type(processor).__qualname__}"
            if initial:
                raise UnsupportedPipelineError(
                    f"cannot guard attention layer {site.name} of {type(self.pipe).__name__}: its processor {what} is "
                    "not one gie_guard can reproduce (IP-Adapters on transformer backbones, custom processors and "
                    "unsupported fused projections are refused; reset with set_default_attn_processor())"
                )
            self.fail(f"the processor of {site.name} was replaced mid-call by {what}, which gie_guard cannot reproduce")

    # -- pipeline wrappers ---------------------------------------------------------------------
    def _wrap_encode(self, encode: Callable[..., Any]) -> Callable[..., Any]:
        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            result = encode(*args, **kwargs)
            if threading.get_ident() == self.thread:
                prompt, negative = self.family.prompt_embeddings(result, self._encode_calls)
                self._encode_calls += 1
                if prompt is not None:
                    self._prompt.append(prompt)
                if negative is not None:
                    self._negative.append(negative)
            return result

        return encode_prompt

    def _wrap_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def scheduler_step(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            if threading.get_ident() == self.thread and not self._probing:
                self._end_step()
            return out

        return scheduler_step

    def _end_step(self) -> None:
        if self.record.total_steps is None:
            self.fail("the scheduler stepped before the denoiser ran")
        if self._in_window(self.step) and self._inhibits() and not self._step_guarded:
            self.fail(f"step {self.step} lies in the window but no denoiser call in it carried the prompt")
        self.step += 1
        self.record.steps_run = self.step
        self._step_guarded = False

    # -- denoiser hooks ------------------------------------------------------------------------
    def _inhibits(self) -> bool:
        return self.inhibit and self.scales is not None

    def _in_window(self, step: int) -> bool:
        return step in self._window_steps

    def _start_clock(self) -> None:
        record = self.record
        if record.total_steps is None:
            record.total_steps = self._announced_steps()
            self._window_steps = set(self.plan.window.steps(record.total_steps))
            record.window_widened = self.plan.window.widened(record.total_steps)

    def _before_aux(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A ControlNet's call in the step in progress: its prompt rows, inhibited as the step is."""
        if threading.get_ident() != self.thread or self._probing:
            return
        self._start_clock()
        rows = self._prompt_rows(args, kwargs)
        self.rows = _as_index(rows)
        self.active = bool(rows) and self.plan.concepts != () and self.step in self._window_steps and self._inhibits()
        self.measuring = self.observing = False
        for hooks in self._cross:
            hooks.applied = 0

    def _after_aux(self, sites: tuple[Site, ...]) -> Callable[..., None]:
        def after(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if threading.get_ident() != self.thread or self._probing:
                return
            if self.active:
                missed = [s.name for s in sites if self._applied(s) == 0]
                if missed:
                    self.fail(f"in step {self.step} the inhibitor did not run in {len(missed)} ControlNet attention "
                              f"layer(s) ({', '.join(missed[:3])})")
            self.active = False

        return after

    def _before_denoiser(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
        if threading.get_ident() != self.thread:
            return None  # another thread's (unguarded) call of a shared model: not ours
        if self._probing:
            return self._ride(args, kwargs) if self._riding else None
        record = self.record
        self._start_clock()
        assert record.total_steps is not None
        if self.step >= record.total_steps:
            self.fail(f"ran its {self._denoiser_name} {record.denoiser_calls + 1} times for {record.total_steps} "
                      "denoising steps (a call after the last step)")
        record.denoiser_calls += 1
        self._check_processors(initial=False)
        first_of_step = self._step_started != self.step
        self._step_started = self.step
        rows = self._prompt_rows(args, kwargs)
        in_window = self.step in self._window_steps
        wants = bool(rows) and self.plan.concepts != ()
        if first_of_step and self.scale_source is not None and wants:
            self._ask_scales(module, args, kwargs, rows)
        self.rows = _as_index(rows)
        self.active = wants and in_window and self._inhibits()
        joint = self.family.joint
        # A joint family measures only where its own attention runs anyway (an inhibited step,
        # a probe pass, an observe-only call): elsewhere the block's processor must run untouched.
        may_ride = self.active or not self.inhibit or not joint or bool(self.observers)
        self.measuring = wants and may_ride and self.step == 0 and not record.first_step_attention
        self.observing = wants and may_ride and bool(self.observers)
        if self.active:
            record.guarded_calls += 1
            self._step_guarded = True
        self._nonzero = []
        for hooks in self._cross:
            hooks.applied = 0
        for _, _, processor in self._joint:
            processor.applied = 0
        self._riding = self.family.joint and (self.active or self.measuring or self.observing)
        return self._ride(args, kwargs) if self._riding else None

    def _ride(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        tokens = self.plan.ride_along_tokens(self.denoiser)  # concepts', then anchors' carried tokens
        text = self.family.denoiser_text(args, kwargs)
        if text is None:
            self.fail("its denoiser was called without text states")
        self.text_length = int(text.shape[1])
        self.concept_length = int(tokens.shape[0])
        self.concept_spans = self.plan.ride_along_spans
        return self.family.ride_along(args, kwargs, tokens)

    def _after_denoiser(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if threading.get_ident() != self.thread or self._probing:
            return
        if self.active:
            expected = self.family.expected_sites(self.sites, kwargs)
            missed = [s.name for s in expected if self._applied(s) == 0]
            if missed:
                self.fail(f"in step {self.step} the inhibitor did not run in {len(missed)} attention layer(s) "
                          f"({', '.join(missed[:3])}{', ...' if len(missed) > 3 else ''}): their processor or "
                          "forward was changed or bypassed")
            sample = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
            if isinstance(sample, torch.Tensor) and not bool(torch.isfinite(sample).all()):
                self.fail(f"the guarded step {self.step} produced non-finite values (scale too large for this model?)")
            steps = self.record.steps_inhibited
            if self._nonzero and bool(torch.stack(self._nonzero).any()) and (not steps or steps[-1] != self.step):
                steps.append(self.step)
            self._nonzero = []
        self.active = self.measuring = self.observing = self._riding = False

    def _applied(self, site: Site) -> int:
        for hooks in self._cross:
            if hooks.site is site:
                return hooks.applied
        for s, _, processor in self._joint:
            if s is site:
                return processor.applied
        return 0

    def _announced_steps(self) -> int:
        pipe = self.pipe
        total = pipe.__dict__.get("_num_timesteps")  # cleared at install: only this call's value counts
        if total is None:
            # Pipelines that do not record it (PixArt, T2I-Adapter) loop over every timestep set; one
            # that loops over fewer without saying so ends with fewer steps than this and is withheld.
            timesteps = getattr(pipe.scheduler, "timesteps", None)
            total = len(timesteps) if timesteps is not None else None
        if not isinstance(total, int) or total <= 0:
            self.fail("the pipeline did not announce its number of denoising steps before running its denoiser, "
                      "so the step window cannot be applied")
        guidance = getattr(pipe, "do_classifier_free_guidance", None)
        self.record.classifier_free_guidance = bool(guidance) if guidance is not None else None
        return int(total)

    # -- rows ----------------------------------------------------------------------------------
    def _prompt_rows(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
        text = self.family.denoiser_text(args, kwargs)
        if text is None:
            self.fail("its denoiser was called without text states")
        key = (id(text), text.data_ptr(), text._version)
        rows = self._rows_cache.get(key)
        if rows is None:
            rows = self._match_rows(text)
            self._rows_cache[key] = rows
            layout = (int(text.shape[0]), rows)
            if layout not in self.record.row_layouts:
                self.record.row_layouts.append(layout)
        return rows

    def _match_rows(self, text: torch.Tensor) -> tuple[int, ...]:
        if not self._prompt:
            self.fail("its prompt embeddings were not produced by its encode_prompt, so the rows that carry the "
                      "prompt cannot be identified")
        prompt = [p[i] for p in self._prompt for i in range(p.shape[0])]
        negative = [n[i] for n in self._negative for i in range(n.shape[0])]
        rows = []
        for r in range(text.shape[0]):
            row = text[r]
            if any(row.shape == p.shape and torch.equal(row, p.to(row.device, row.dtype)) for p in prompt):
                rows.append(r)
            elif not any(row.shape == n.shape and torch.equal(row, n.to(row.device, row.dtype)) for n in negative):
                self.fail(f"row {r} of a denoiser batch of {text.shape[0]} matches neither the prompt nor the "
                          "negative prompt, so the rows to guard cannot be identified")
        return tuple(rows)

    # -- scales --------------------------------------------------------------------------------
    def _ask_scales(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], rows: tuple[int, ...]) -> None:
        source = self.scale_source
        assert source is not None
        started = time.perf_counter()
        if self.step == 0 and source.probe:
            self._probe(module, args, kwargs, rows)
        new = source.scales(self.step, self.record if self.record.first_step_attention else None)
        if new is not None:
            self.scales = new.to(device=self._device, dtype=torch.float32)
        self.record.probe_seconds += time.perf_counter() - started

    def _probe(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], rows: tuple[int, ...]) -> None:
        """One extra denoiser evaluation of the prompt rows at step 0, measuring only."""
        batch = self.family.batch_size(args, kwargs)
        index = _as_index(rows)
        p_args = tuple(_rows_of(a, index, batch) for a in args)
        p_kwargs = {k: v if k in self.family.shared_kwargs else _rows_of(v, index, batch) for k, v in kwargs.items()}
        self._probing = True
        self.rows = slice(0, len(rows))
        self.measuring, self.active, self.observing = True, False, False
        self._riding = self.family.joint
        try:
            with torch.no_grad():
                module(*p_args, **p_kwargs)
        finally:
            self._probing = False
            self._riding = False
            self.measuring = False

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
            if _interrupted(self.pipe):
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


def _interrupted(pipe: Any) -> bool:
    return bool(getattr(pipe, "_interrupt", False))


def _as_index(rows: tuple[int, ...]) -> slice | torch.Tensor:
    if rows and rows == tuple(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, dtype=torch.long)


def _rows_of(value: Any, index: slice | torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value[index.to(value.device) if isinstance(index, torch.Tensor) else index]
    if isinstance(value, dict):
        return {k: _rows_of(v, index, batch) for k, v in value.items()}
    return value


@contextlib.contextmanager
def observing(pipe: Any, observer: MapObserver) -> Iterator[MapObserver]:
    """Within the block, every guarded call of ``pipe`` (by any code) hands its maps to
    ``observer`` too (pictures of calls a Guard makes)."""
    denoiser = family_for(pipe).denoiser(pipe)
    with _LOCKS_GUARD:
        _OBSERVERS.setdefault(denoiser, []).append(observer)
    try:
        yield observer
    finally:
        with _LOCKS_GUARD:
            _OBSERVERS.get(denoiser, []).remove(observer)


@contextlib.contextmanager
def guarded_call(
    pipe: Any,
    plan: Plan,
    *,
    scale_source: ScaleSource | None = None,
    observers: Sequence[MapObserver] = (),
    inhibit: bool = True,
) -> Iterator[CallRecord]:
    """Within the block, ``pipe``'s denoiser runs the plan's growth inhibitors; on a normal
    exit the call's invariants are checked (GuardedCallError withholds the output).
    An empty plan with no observer installs nothing: the call is bit-identical."""
    family = plan.family
    denoiser = family.denoiser(pipe)
    with _LOCKS_GUARD:
        observers = (*observers, *_OBSERVERS.get(denoiser, ()))
    with _locked([denoiser, getattr(pipe, "scheduler", None)]), ownership.inside(family.owned_models(pipe)):
        if plan.is_empty and not observers:
            yield CallRecord(family=family.name, pipeline_class=type(pipe).__name__)
            return
        if _ACTIVE.get(denoiser) is not None:
            raise GuardedCallError(
                f"{type(pipe).__name__}: its {family.denoiser_attr} is already inside a guarded call in this thread "
                "(a guarded call made from within another one)"
            )
        call = EngineCall(pipe, plan, scale_source=scale_source, observers=observers, inhibit=inhibit)
        _ACTIVE[denoiser] = call
        try:
            call.install()
            yield call.record
            call.finish()
        finally:
            call.remove()
            _ACTIVE.pop(denoiser, None)
