"""The step clock of one guarded call: which denoising step is in progress, which steps
lie in the window, and the invariants about steps.

A step is counted by the scheduler's ``step`` call, so a step is one step however many
times the denoiser runs in it (SD3 skip-layer guidance, Flux true CFG).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from ..window import StepWindow

__all__ = ["StepClock"]

_MISSING = object()


class StepClock:
    def __init__(self, pipe: Any, window: StepWindow, fail: Callable[[str], NoReturn]) -> None:
        self.pipe = pipe
        self.window = window
        self.fail = fail
        self.total: int | None = None  # announced by the pipeline before its first denoiser call
        self.widened = False
        self.guidance: bool | None = None  # whether the pipeline said it runs classifier-free guidance
        self.step = 0  # index of the step in progress (completed scheduler steps)
        self._window: set[int] = set()
        self._started = -1  # the step whose first denoiser call has been seen
        self._guarded = False  # some denoiser call of the step in progress carried the prompt, inhibited
        self._stale: Any = _MISSING

    def install(self) -> None:
        """A step count left by an earlier call must not pass for this call's."""
        self._stale = self.pipe.__dict__.get("_num_timesteps", _MISSING)
        if self._stale is not _MISSING:
            self.pipe.__dict__["_num_timesteps"] = None

    def restore(self) -> None:
        if self._stale is not _MISSING and self.pipe.__dict__.get("_num_timesteps") is None:
            self.pipe.__dict__["_num_timesteps"] = self._stale

    def start(self) -> None:
        """Read the number of steps once, at the first denoiser (or ControlNet) call."""
        if self.total is None:
            self.total = self._announced()
            self._window = set(self.window.steps(self.total))
            self.widened = self.window.widened(self.total)

    def in_window(self) -> bool:
        return self.step in self._window

    def first_call_of_step(self) -> bool:
        """True for the first denoiser call of the step in progress (and marks it seen)."""
        first = self._started != self.step
        self._started = self.step
        return first

    def guarded(self) -> None:
        self._guarded = True

    def end_step(self, inhibits: bool) -> None:
        """The scheduler stepped: the step in progress is complete."""
        if self.total is None:
            self.fail("the scheduler stepped before the denoiser ran")
        if self.in_window() and inhibits and not self._guarded:
            self.fail(f"step {self.step} lies in the window but no denoiser call in it carried the prompt")
        self.step += 1
        self._guarded = False

    def _announced(self) -> int:
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
        self.guidance = bool(guidance) if guidance is not None else None
        return int(total)
