"""What one guarded call did, for the caller to read (also attached to the pipeline's
output as ``output.guard_report``, so it survives executors and async code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AppliedConcept:
    """One concept as applied in a call."""

    id: str
    text: str
    token_positions: tuple[int, ...]  # slots of the concept's own tokens in its encoding
    token_scales: tuple[float, ...]  # w per kept token, in the order of token_positions
    scale_source: str  # "policy", or where an automatic scale came from
    # at the first denoising step, per attention site (the family's order): the share of the
    # concept's attention map that falls on its own tokens, averaged over heads, pixels and the
    # rows that carry the prompt. Empty when nothing was measured.
    attention_per_layer: tuple[float, ...] = ()
    adapter: str | None = None  # for `scale: auto`: the adapter that chose token_scales (name@fingerprint)
    # presence gating (policy `presence:`): per image of the call, the measured presence and
    # the factor its scales were multiplied by (1 inhibited, 0 spared). Empty when not gated.
    presence: tuple[float, ...] = ()
    gate: tuple[float, ...] = ()

    @property
    def attention(self) -> float | None:
        """Mean over layers of ``attention_per_layer``: how strongly the image attends to the
        concept at the first step."""
        if not self.attention_per_layer:
            return None
        return sum(self.attention_per_layer) / len(self.attention_per_layer)


@dataclass(frozen=True)
class GuardReport:
    """The report of one guarded call (``output.guard_report``, ``guard.last_report``)."""

    policy_name: str
    policy_hash: str
    pipeline_class: str
    concepts: tuple[AppliedConcept, ...]
    steps_inhibited: tuple[int, ...]  # denoising step indices (0-based) that were inhibited
    total_steps: int  # denoising steps the call announced (0 when nothing was installed)
    step_window: tuple[float, float]
    classifier_free_guidance: bool | None  # None when nothing was installed or the family has no CFG batch
    added_seconds: float  # guard's own work: plan compilation (first call) + inhibitors + scale inference
    call_seconds: float  # wall time of the whole guarded call
    scale_inference_seconds: float = 0.0  # adapters: probe pass + prediction (part of added_seconds)
    feature_pass: str | None = None  # adapters: "probe" or "reuse" when an adapter set a scale
    family: str = ""  # the engine family that guarded the call ("sd", "sdxl", "sd3", "flux", ...)
    sink: str = ""  # what competes with a concept's tokens in its map ("own", "prompt", "image")
    # (batch size, indices of the rows that carried the prompt) for each kind of denoiser call seen
    rows_guarded: tuple[tuple[int, tuple[int, ...]], ...] = ()
    steps_run: int = 0  # denoising steps that ran (less than total_steps when interrupted)
    interrupted: bool = False  # stopped early from callback_on_step_end: the output is partial
    window_widened: bool = False  # the window covered no whole step and was widened to one (gie_guard.window)
    denoiser_calls: int = 0
    # attention layers whose processor other code replaced during the call (left as they are)
    processor_changes: tuple[str, ...] = ()

    @property
    def concept_ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.concepts)


@dataclass(frozen=True)
class GuardedOutput:
    """``guard.generate(...)``: the pipeline's output, the call's report, and what the
    policy's verifiers found (None when no concept asks for verification)."""

    output: Any
    report: GuardReport
    verification: Any = None  # gie_guard.verifiers.Verification

    @property
    def outcome(self) -> str:
        """The call's outcome as metrics count it: ok, recorded or blurred (blocked raises)."""
        return self.verification.outcome if self.verification is not None else "ok"

    @property
    def images(self) -> Any:
        return self.output[0] if isinstance(self.output, tuple) else self.output.images
