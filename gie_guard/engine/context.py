"""What the sites of one call may read: the call's fixed inputs (:class:`CallShared`) and the
denoiser call in progress (:class:`StepContext`).

Both are immutable. The coordinator makes a new StepContext for every denoiser call and
hands it to the sites through ``CallShared.context()``; sites read it and report what they
did (sites.SiteOutcome); only the coordinator writes the call's record.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, NoReturn

import torch

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["CallShared", "RideAlong", "SiteText", "StepContext", "as_index"]


@dataclass(frozen=True)
class RideAlong:
    """Joint families: where the carried concept tokens sit in a denoiser call's text sequence."""

    text_length: int  # the prompt's text tokens; the carried tokens follow them
    concept_length: int  # all carried tokens: every concept's, then every anchor's
    spans: tuple[tuple[int, int], ...]  # per concept, then per anchor, [lo, hi) within the carried tokens


@dataclass(frozen=True)
class StepContext:
    """One denoiser call as the sites see it."""

    step: int  # index of the denoising step in progress
    rows: slice | torch.Tensor  # the batch rows that carry the prompt
    inhibit: bool  # subtract the inhibitors
    measure: bool  # measure first-step maps (adapters, presence gates)
    observe: bool  # hand each site's maps to observers
    scales: torch.Tensor | None  # (C, T) or per image (rows, C, T), on the denoiser's device
    ride: RideAlong | None = None  # joint families: the carried tokens, when they ride in this call
    thread: int = 0  # the thread of the call; other threads' attention is not ours

    @property
    def wants_query(self) -> bool:
        return self.inhibit or self.measure or self.observe

    def scales_for(self, rows: int) -> torch.Tensor:
        """The scales for ``rows`` guarded rows: ``(C, T)``, or per image ``(rows, C, T)``
        (per-image scales repeat over chunks of prompt rows, as PAG's perturbed copy)."""
        scales = self.scales
        if scales is None:
            raise ValueError("this denoiser call has no scales")
        if scales.ndim == 3 and scales.shape[0] != rows:
            if rows % scales.shape[0]:
                raise ValueError(f"per-image scales for {scales.shape[0]} rows, but the call guards {rows}")
            return scales.repeat(rows // scales.shape[0], 1, 1)
        return scales


@dataclass(frozen=True, eq=False)
class SiteText:
    """Encodings as cross-attention layers receive text (after the denoiser's caption
    projection), for the encoding slots a site ever projects: all of them where a concept's
    own softmax runs over its whole encoding, else only its own tokens (the prompt sink's
    inserted columns, anchors). The projection is per token, so leaving slots out is exact."""

    states: torch.Tensor  # (C, S, D) over ``slots``
    slots: tuple[int, ...]  # the encoding slots the S columns stand for

    @cached_property
    def _column_of(self) -> dict[int, int]:
        return {slot: i for i, slot in enumerate(self.slots)}

    def columns(self, wanted: Sequence[int]) -> list[int]:
        """The columns of encoding slots ``wanted``."""
        at = self._column_of
        return [at[s] for s in wanted]


@dataclass(frozen=True, eq=False)
class CallShared:
    """What every site of one call reads and nobody changes during it."""

    plan: Plan
    site_text: SiteText | None  # the concepts' encodings as cross-attention layers receive text
    anchor_text: SiteText | None  # the same for preservation anchors (their own tokens)
    reference_text: SiteText | None  # the same for the reference texts of specific maps
    _context: Callable[[], StepContext | None]
    _fail: Callable[[str], NoReturn]

    def context(self) -> StepContext | None:
        """The denoiser call in progress, if this thread runs one of this call's."""
        ctx = self._context()
        return ctx if ctx is not None and ctx.thread == threading.get_ident() else None

    def fail(self, message: str) -> NoReturn:
        """Stop the call: the output is withheld."""
        self._fail(message)

    @property
    def sink(self) -> str:
        return self.plan.sink


def as_index(rows: Sequence[int]) -> slice | torch.Tensor:
    """Batch rows as the cheapest index: a slice when contiguous."""
    rows = tuple(rows)
    if rows and rows == tuple(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, dtype=torch.long)
