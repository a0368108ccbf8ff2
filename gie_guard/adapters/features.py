"""Adapter features in a guarded call, and the hand-off of predicted scales to the engine.

Feature of a concept token ``j``: for each attention site ``l`` (the family's order), the
mean of the concept's attention map ``M_c[..., j]`` over heads, pixels and the rows that
carry the prompt, at the first denoising step with no suppression applied: an
``L``-vector. The engine measures these at step 0; :class:`AdapterScales` is the engine's
:class:`~gie_guard.engine.ScaleSource` for a call, and decides *when* step 0 is unsuppressed:

``probe``
    Before the real step 0, the engine runs the denoiser once more on the prompt rows only,
    with no inhibitor and measuring; the adapter predicts, and step 0 then runs suppressed
    as the window says. Cost: one denoiser evaluation at the prompt rows' batch.
``reuse``
    Step 0 itself is measured; auto concepts are not suppressed at step 0 (their scales are
    0 there) and get the predicted scales from step 1 on. Cost: nothing beyond measuring.
    Changes the window by one step when it starts at 0.
``auto`` (default)
    ``reuse`` when the window does not include step 0 (then it is free and loses nothing),
    ``probe`` otherwise.

With a batch of prompts in one call the features are the mean over all prompt rows, so
every image of the call gets the same scale per concept token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..engine import ConceptSpec, Plan, StepWindow, compile_plan, guarded_call
from ..errors import ConfigurationError
from .model import resolve_scales
from .selection import AutoChoice

__all__ = [
    "AdapterScales",
    "AutoScaleResult",
    "FeaturePass",
    "check_feature_pass",
    "measure_features",
    "token_features",
]

FeaturePass = Literal["auto", "probe", "reuse"]


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


def check_feature_pass(mode: str) -> str:
    if mode not in ("auto", "probe", "reuse"):
        raise ConfigurationError(f"feature_pass must be one of auto, probe, reuse; got {mode!r}")
    return mode


@dataclass
class AdapterScales:
    """The scale source of one call for a plan's ``scale: auto`` concepts (the engine asks it)."""

    plan: Plan
    choices: Sequence[AutoChoice]
    mode: str = "auto"
    results: dict[str, AutoScaleResult] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        check_feature_pass(self.mode)
        if self.mode == "auto":
            self.mode = "probe" if self.plan.window.start == 0 else "reuse"
        by_id = {c.concept_id: c for c in self.choices}
        self._rows = [(r, spec, pos, by_id[spec.id]) for r, (spec, pos)
                      in enumerate(zip(self.plan.concepts, self.plan.token_positions)) if spec.id in by_id]
        assert self.plan.token_scales is not None
        self._scales = self.plan.token_scales.clone()
        for r, _, pos, _ in self._rows:  # nothing is applied for auto concepts until predicted
            self._scales[r, list(pos)] = 0.0
        self._done = False

    @property
    def current(self) -> torch.Tensor:
        """The scales as the engine applies them now, (C, T)."""
        return self._scales

    @property
    def probe(self) -> bool:
        return self.mode == "probe"

    def scales(self, step: int, measured: Any) -> torch.Tensor | None:
        if self._done:
            return None
        if measured is None or (self.mode == "reuse" and step == 0):
            return self._scales  # auto concepts at 0 until their features are measured
        for r, spec, pos, choice in self._rows:
            feats = token_features(measured.first_step_attention, self.plan.layer_names, r, pos)
            raw = choice.adapter.predict(feats)
            scales, nonfinite = resolve_scales(raw, lo=choice.lo, hi=choice.hi, fallback=choice.fallback)
            self._scales[r, list(pos)] = scales.to(self._scales)
            self.results[spec.id] = AutoScaleResult(
                spec.id, choice.adapter.label, choice.adapter.path, feats,
                tuple(float(x) for x in raw), tuple(float(x) for x in scales), nonfinite, step,
            )
        self._done = True
        return self._scales


@torch.no_grad()
def measure_features(pipe: Any, concept_text: str, *, first_step_only: bool = False, **call_kwargs: Any) -> tuple[Any, torch.Tensor]:
    """Run ``pipe(**call_kwargs)`` with nothing inhibited (the output is the pipeline's own)
    while measuring the features of ``concept_text``: returns ``(output, features (tokens, L))``.
    With several prompts in the call, the features are their mean. ``first_step_only``
    stops the denoising loop after step 0 (one denoiser evaluation; the output is then
    meaningless): the cheap way to get features alone."""
    plan = compile_plan(pipe, [ConceptSpec("probe", concept_text, 1.0, "measure")], StepWindow(0.0, 1.0))
    if first_step_only:

        def stop(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            pipeline._interrupt = True  # the pipelines' loops skip the remaining steps
            return callback_kwargs

        call_kwargs = {**call_kwargs, "callback_on_step_end": stop, "output_type": "latent"}
    with guarded_call(pipe, plan, inhibit=False) as record:
        output = pipe(**call_kwargs)
    return output, token_features(record.first_step_attention, plan.layer_names, 0, plan.token_positions[0])
