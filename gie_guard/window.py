"""The step window: which denoising steps a guarded call inhibits (no torch import).

Step ``i`` of ``n`` lies in the window ``[start, end)`` when ``start * n <= i < end * n``.
A window narrower than one step can cover no step at all at some step counts (``[0.5, 1]``
at 1 step, ``[0.9, 1]`` at 5). A guard that then inhibited nothing would return unguarded
output while reporting success, so the window is **widened to one step**: when it covers
no whole step at ``n`` steps, step ``min(floor(start * n), n - 1)`` (the step in which the
window starts) is inhibited. ``gie-guard policy check`` warns about such windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["StepWindow"]


@dataclass(frozen=True)
class StepWindow:
    """Fractions ``0 <= start < end <= 1`` of the denoising steps to inhibit."""

    start: float = 0.0
    end: float = 0.8

    def __post_init__(self) -> None:
        ok = isinstance(self.start, (int, float)) and isinstance(self.end, (int, float))
        if not (ok and math.isfinite(self.start) and math.isfinite(self.end) and 0.0 <= self.start < self.end <= 1.0):
            from .errors import ConfigurationError

            raise ConfigurationError(f"step window must satisfy 0 <= start < end <= 1, got [{self.start}, {self.end}]")

    def covered(self, total: int) -> tuple[int, ...]:
        """Step indices the window covers at ``total`` steps, before widening (may be empty)."""
        first = math.ceil(self.start * total - 1e-9)
        return tuple(i for i in range(max(first, 0), total) if i < self.end * total - 1e-9)

    def steps(self, total: int) -> tuple[int, ...]:
        """Step indices inhibited at ``total`` steps: the covered ones, or the one step of
        the widening rule (never empty for ``total >= 1``)."""
        if total < 1:
            return ()
        covered = self.covered(total)
        return covered or (min(math.floor(self.start * total), total - 1),)

    def widened(self, total: int) -> bool:
        """True when the window covers no whole step at ``total`` steps and is widened."""
        return total >= 1 and not self.covered(total)
