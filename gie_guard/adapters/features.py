"""Adapter features in a guarded call, and the hand-off of predicted scales to the engine.

Feature of a concept token ``j``: for each cross-attention layer ``l`` (UNet order), the
mean of the concept's attention map ``M_c[..., j]`` (softmax over the concept's own
encoding) over heads, pixels and the conditional rows, at the first denoising step with
no suppression applied: an ``L``-vector. The engine measures these at step 0
(``CallState.first_step_attention``); this module decides *when* step 0 is unsuppressed:

``probe``
    Before the real step 0, the UNet runs once more on the conditional rows only, with no
    inhibitor and measuring on; the adapter predicts, the scales are written into the
    call's ``token_scales``, and then step 0 runs suppressed as the window says. Cost: one
    UNet evaluation at half the CFG batch, i.e. about ``1 / (2 * steps)`` of the call.
``reuse``
    Step 0 itself is measured; auto concepts are not suppressed at step 0 (their scales are
    0 there) and get the predicted scales from step 1 on. Cost: nothing beyond measuring.
    Changes the window by one step when it starts at 0.
``auto`` (default)
    ``reuse`` when the window does not include step 0 (then it is free and loses nothing),
    ``probe`` otherwise.

With a batch of prompts in one call the features are the mean over all conditional rows,
so every image of the call gets the same scale per concept token (the engine has one
``token_scales`` per call).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..engine import ConceptSpec, Plan, StepWindow, compile_plan, installed
from ..errors import GuardError
from .model import resolve_scales
from .selection import AutoChoice

__all__ = [
    "AutoScaleResult",
    "FeaturePass",
    "ScaleInference",
    "check_feature_pass",
    "measure_features",
    "scale_inference",
    "token_features",
]

FeaturePass = Literal["auto", "probe", "reuse"]
FEATURE_PASSES = ("auto", "probe", "reuse")


def token_features(
    first_step_attention: dict[str, torch.Tensor], layer_names: Sequence[str], row: int, positions: Sequence[int]
) -> torch.Tensor:
    """``(len(positions), L)``: per concept token, its measured attention in each layer.
    A layer that was not measured gives NaN (and the non-finite rule then applies)."""
    columns = []
    for name in layer_names:
        measured = first_step_attention.get(name)
        if measured is None:
            columns.append(torch.full((len(positions),), float("nan")))
        else:
            columns.append(measured[row, list(positions)].float().cpu())
    return torch.stack(columns, dim=-1)


@dataclass(frozen=True)
class AutoScaleResult:
    """What the adapter did for one concept in one call."""

    concept_id: str
    adapter: str  # the adapter's label, name@fingerprint-digest
    adapter_path: str | None
    features: torch.Tensor  # (tokens, L)
    raw: tuple[float, ...]  # predictions per token, before the rule
    scales: tuple[float, ...]  # applied, per token
    nonfinite: bool  # some prediction was non-finite; the rule replaced it
    from_step: int  # first step at which the predicted scales applied


@dataclass
class ScaleInference:
    """Per call: the results per auto concept and the seconds spent (probe + prediction)."""

    mode: str = "none"
    results: dict[str, AutoScaleResult] = field(default_factory=dict)
    seconds: float = 0.0


def _rows(value: Any, rows: slice, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, dict):
        return {k: _rows(v, rows, batch) for k, v in value.items()}
    return value


def check_feature_pass(mode: str) -> str:
    if mode not in FEATURE_PASSES:
        raise GuardError(f"feature_pass must be one of {', '.join(FEATURE_PASSES)}; got {mode!r}")
    return mode


@contextlib.contextmanager
def scale_inference(
    pipe: Any, plan: Plan, state: Any, choices: Sequence[AutoChoice], mode: FeaturePass = "auto"
) -> Iterator[ScaleInference]:
    """Within a call (inside ``engine.installed``), predict the auto concepts' scales from
    first-step features and write them into ``state.token_scales``."""
    check_feature_pass(mode)
    inference = ScaleInference()
    by_id = {c.concept_id: c for c in choices}
    rows = [(r, spec, pos, by_id[spec.id]) for r, (spec, pos) in enumerate(zip(plan.concepts, plan.token_positions)) if spec.id in by_id]
    if state is None or not rows:
        yield inference
        return
    if mode == "auto":
        mode = "probe" if plan.window.start == 0 else "reuse"
    inference.mode = mode
    # the state's tensor may be the plan's own (`.to` on the same device returns it): copy
    state.token_scales = state.token_scales.clone()
    for r, _, pos, _ in rows:  # nothing is applied for auto concepts until predicted
        state.token_scales[r, list(pos)] = 0.0
    done = False

    def predict(from_step: int) -> None:
        for r, spec, pos, choice in rows:
            feats = token_features(state.first_step_attention, plan.layer_names, r, pos)
            raw = choice.adapter.predict(feats)
            scales, nonfinite = resolve_scales(raw, lo=choice.lo, hi=choice.hi, fallback=choice.fallback)
            state.token_scales[r, list(pos)] = scales.to(state.token_scales)
            inference.results[spec.id] = AutoScaleResult(
                spec.id, choice.adapter.label, choice.adapter.path, feats,
                tuple(float(x) for x in raw), tuple(float(x) for x in scales), nonfinite, from_step,
            )

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        nonlocal done
        if done or getattr(state, "probing", False):
            return
        started = time.perf_counter()
        if mode == "probe" and state.step == 0:
            batch = args[0].shape[0] if args else kwargs["sample"].shape[0]
            rows_ = state.conditional_rows(batch)
            p_args = tuple(_rows(a, rows_, batch) for a in args)
            p_kwargs = {k: _rows(v, rows_, batch) for k, v in kwargs.items()}
            saved = (state.active, state.classifier_free_guidance, state.inhibitor_seconds)
            state.probing, state.active, state.classifier_free_guidance = True, False, False
            try:
                with torch.no_grad():
                    module(*p_args, **p_kwargs)
            finally:
                state.probing = False
                state.active, state.classifier_free_guidance, state.inhibitor_seconds = saved
            state.measure_first_step = False  # keep the clean measurement; step 0 now runs suppressed
            predict(0)
            done = True
        elif mode == "reuse" and state.step >= 1:
            predict(state.step)
            done = True
        inference.seconds += time.perf_counter() - started

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield inference
    finally:
        handle.remove()


@torch.no_grad()
def measure_features(pipe: Any, concept_text: str, *, first_step_only: bool = False, **call_kwargs: Any) -> tuple[Any, torch.Tensor]:
    """Run ``pipe(**call_kwargs)`` unguarded (the output is the pipeline's own) while
    measuring the features of ``concept_text``: returns ``(output, features (tokens, L))``.
    With several prompts in the call, the features are their mean. ``first_step_only``
    stops the denoising loop after step 0 (one UNet evaluation; the output is then
    meaningless): the cheap way to get features alone."""
    plan = compile_plan(pipe, [ConceptSpec("probe", concept_text, 1.0, "measure")], StepWindow(0.0, 1.0))
    if first_step_only:

        def stop(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            pipeline._interrupt = True  # the SD/SDXL loops skip the remaining steps
            return callback_kwargs

        call_kwargs = {**call_kwargs, "callback_on_step_end": stop, "output_type": "latent"}
    with installed(pipe, plan) as state:
        state.window_start = state.window_end = 0.0  # never inhibit: measure only
        output = pipe(**call_kwargs)
    return output, token_features(state.first_step_attention, plan.layer_names, 0, plan.token_positions[0])
