"""Presence gating: inhibit a concept in an image only where the first step shows it.

The engine measures each concept's map at the first denoising step for every image (the
share of each position's attention on the concept's own tokens, averaged over heads and
positions, per attention site). The concept's *presence* in image ``i`` is the mean of that
share over the sites. With mode ``gate`` the concept's scales in image ``i`` are kept when
its presence reaches the concept's threshold and set to 0 otherwise; with mode ``scale``
they are multiplied by ``min(1, presence / threshold)``. Each concept has its own mode.

The measurement must see step 0 unsuppressed: ``probe=True`` runs one extra denoiser pass on
the prompt rows before step 0 (cost: about one step at the prompt rows' batch); ``probe=False``
leaves gated concepts uninhibited in step 0 and applies the decision from step 1 on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .plan import Plan

__all__ = ["PresenceGate", "presence"]


def presence(record: Any, plan: Plan) -> torch.Tensor:
    """``(rows, C)``: each concept's first-step presence per image (mean over sites of its
    own tokens' share)."""
    per_site = [record.first_step_rows[name] for name in plan.site_names if name in record.first_step_rows]
    if not per_site:
        return torch.zeros(0, len(plan.concepts))
    stacked = torch.stack(per_site)  # (sites, rows, C, T)
    own = torch.zeros(stacked.shape[-2:], dtype=torch.bool)
    for c, positions in enumerate(plan.token_positions):
        own[c, list(positions)] = True
    return (stacked * own).sum(-1).mean(0)


@dataclass
class PresenceGate:
    """A scale source (gie_guard.engine.ScaleSource) gating ``plan``'s concepts per image;
    ``base`` (adapters) supplies the scales it gates, else the plan's."""

    plan: Plan
    thresholds: Sequence[float | None]  # per plan concept; None: not gated
    mode: Literal["gate", "scale"] | Sequence[Literal["gate", "scale"]] = "gate"  # one for all, or per concept
    probe: bool = True
    base: Any = None
    measured_presence: torch.Tensor | None = field(default=None, init=False)  # (rows, C), for the report
    factor: torch.Tensor | None = field(default=None, init=False)  # (rows, C): 1 inhibit ... 0 spare
    _done: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.base is not None:
            self.probe = self.probe or bool(self.base.probe)
        self._gated = torch.tensor([t is not None for t in self.thresholds])
        self._threshold = torch.tensor([t if t is not None else 0.0 for t in self.thresholds], dtype=torch.float32)
        modes = [self.mode] * len(self.thresholds) if isinstance(self.mode, str) else list(self.mode)
        if len(modes) != len(self.thresholds) or not set(modes) <= {"gate", "scale"}:
            raise ValueError(f"mode must be gate or scale, one or one per concept; got {self.mode!r}")
        self._scaled = torch.tensor([m == "scale" for m in modes])
        assert self.plan.token_scales is not None
        self._current = self.plan.token_scales.clone()

    @property
    def current(self) -> torch.Tensor:
        return self._current

    def scales(self, step: int, measured: Any) -> torch.Tensor | None:
        if self.base is not None:
            new = self.base.scales(step, measured)
            if new is not None:
                self._current = new.clone()
        if self._done:
            return None if self.base is None else self._gate_again()
        if measured is None:  # step 0 without a probe: gated concepts wait for their measurement
            held = self._current.clone()
            held[self._gated] = 0.0
            return held
        present = presence(measured, self.plan)  # (rows, C)
        self.measured_presence = present
        gate = (present >= self._threshold).float()
        scale = (present / self._threshold.clamp_min(1e-12)).clamp(max=1.0)
        factor = torch.where(self._scaled, scale, gate)
        self._factor = torch.where(self._gated, factor, torch.ones_like(factor))  # (rows, C)
        self.factor = self._factor
        self._done = True
        return self._gate_again()

    def _gate_again(self) -> torch.Tensor:
        base = self._current if self._current.ndim == 3 else self._current[None]
        return base * self._factor[:, :, None]
