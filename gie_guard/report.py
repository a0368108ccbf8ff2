"""What one guarded call did, for the caller to read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AppliedConcept:
    """One concept as applied in a call."""

    id: str
    text: str
    token_positions: tuple[int, ...]  # slots of the concept's own tokens in its encoding
    token_scales: tuple[float, ...]  # w per kept token, in the order of token_positions
    scale_source: str  # "policy", or where an automatic scale came from
    # at the first denoising step, per cross-attention layer (UNet order): the share of the
    # concept's attention (softmax over its own encoding) that falls on its own tokens,
    # averaged over heads, pixels and conditional rows. Empty when nothing was measured.
    attention_per_layer: tuple[float, ...] = ()
    adapter: str | None = None  # for `scale: auto`: the adapter that chose token_scales (name@fingerprint)

    @property
    def attention(self) -> float | None:
        """Mean over layers of ``attention_per_layer``: how strongly the image attends to the
        concept at the first step."""
        if not self.attention_per_layer:
            return None
        return sum(self.attention_per_layer) / len(self.attention_per_layer)


@dataclass(frozen=True)
class GuardReport:
    """The report of one guarded call (``guard.last_report``)."""

    policy_name: str
    policy_hash: str
    pipeline_class: str
    concepts: tuple[AppliedConcept, ...]
    steps_inhibited: tuple[int, ...]  # denoising step indices (0-based) that were inhibited
    total_steps: int  # denoising steps the call ran (0 when nothing was installed)
    step_window: tuple[float, float]
    classifier_free_guidance: bool | None  # None when nothing was installed
    added_seconds: float  # guard's own work: plan compilation (first call) + inhibitor attention
    call_seconds: float  # wall time of the whole guarded call
    scale_inference_seconds: float = 0.0  # adapters: probe pass + prediction (part of added_seconds)
    feature_pass: str | None = None  # adapters: "probe" or "reuse" when an adapter set a scale

    @property
    def concept_ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.concepts)
