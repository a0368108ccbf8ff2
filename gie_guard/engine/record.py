"""What a guarded call reports (:class:`CallRecord`) and who may take part in it: scale
sources (adapters, presence gates) and map observers (pictures)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .sites import Site

__all__ = ["CallRecord", "MapObserver", "ScaleSource"]


@dataclass
class CallRecord:
    """What the engine did in one call (the report is built from it). Written only by the
    call's coordinator."""

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
