"""One orchestration for every kind of site: given the image queries, each concept's keys
and values and a sink, measure, observe and inhibit as the denoiser call asks.

Handlers differ only in how they obtain those (hooks around a cross-attention layer's own
processor, a joint block's projections of the carried tokens); the rules written here
(which map adapters measure, what observers see, how preservation anchors act) hold for all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import attention
from .context import StepContext, to_plan_slots

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["ConceptKeys", "ReferenceKeys", "SiteResult", "act", "anchor_effects"]


@dataclass(frozen=True)
class ConceptKeys:
    """The concepts as one attention call of one site sees them."""

    keys: list[torch.Tensor]  # per concept (h, T_c, d), or per row (B, h, T_c, d)
    values: list[torch.Tensor]  # the same shapes; already without what its anchors span (``project``)
    slots: list[list[int]]  # per concept, the plan slot each key column stands for
    competing: list[torch.Tensor | None]  # per concept, anchor keys joining its softmax (``compete``)


@dataclass(frozen=True)
class ReferenceKeys:
    """The reference texts as one attention call of one site sees them (calibrated, gated and
    output maps): keys over the same kind of slots as the concepts' (so each reference's map
    has the same softmax structure), and the columns of its own tokens."""

    keys: list[torch.Tensor]  # per reference (h, T_r, d), or per row (B, h, T_r, d)
    own: list[list[int]]  # per reference, the key columns of its own tokens


@dataclass(frozen=True)
class SiteResult:
    delta: torch.Tensor | None  # (B_rows, h, N, d) to subtract from the rows' attention output
    measured: torch.Tensor | None  # (rows, C, T)
    maps: list[torch.Tensor] | None  # per concept (rows, h, N)


def anchor_effects(
    plan: Plan, values: Sequence[torch.Tensor], anchor_keys: Sequence[torch.Tensor], anchor_values: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
    """Per concept: the keys of its anchors' own tokens that compete in its softmax, and its
    values without what its anchors' values span. ``anchor_*``: per anchor ``(..., h, n, d)``
    over its own tokens."""
    competing: list[torch.Tensor | None] = []
    spared: list[torch.Tensor] = []
    for c, v in enumerate(values):
        mine = plan.concept_anchors[c] if plan.concept_anchors and anchor_keys else ()
        if not mine:
            competing.append(None)
            spared.append(v)
            continue
        competing.append(None if plan.preserve == "project" else torch.cat([anchor_keys[a] for a in mine], dim=-2))
        spared.append(v if plan.preserve == "compete"
                      else attention.project_off(v, torch.cat([anchor_values[a] for a in mine], dim=-2)))
    return competing, spared


def own_columns(plan: Plan, slots: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per concept, the key columns that stand for its own tokens (not start, end, padding)."""
    own = [set(p) for p in plan.token_positions]
    return [[i for i, slot in enumerate(s) if slot in own[c]] for c, s in enumerate(slots)]


def reference_level(q: torch.Tensor, references: ReferenceKeys, *, scale: float,
                    sink_lse: torch.Tensor | None) -> torch.Tensor:
    """What a word that names nothing in particular gets: the references' mean per-own-token
    map, each reference in its own softmax (with the sink, as a concept's): ``(B, h, N)``."""
    levels = [attention.concept_maps(q, k, scale=scale, sink_lse=sink_lse)[..., own].mean(-1)
              for k, own in zip(references.keys, references.own)]
    return torch.stack(levels).mean(0)


def specific_inhibitor(
    q: torch.Tensor, concepts: ConceptKeys, scales: torch.Tensor, plan: Plan, *, scale: float,
    sink_lse: torch.Tensor | None, references: ReferenceKeys | None, gates: list[torch.Tensor] | None,
) -> torch.Tensor:
    """``sum_c sum_j w_j A_c[..., j] V_c[j]`` with ``A_c`` the plan's specific map
    (plan.ConceptMap): ``(B, h, N, d)``. The maps are materialised, ``(B, h, N, T_c)`` float32
    per concept at a time."""
    b = q.shape[0]
    level = None
    if plan.concept_map in ("calibrated", "gated"):
        assert references is not None, "calibrated and gated maps need references"
        level = reference_level(q, references, scale=scale, sink_lse=sink_lse)  # (B, h, N)
    own_cols = own_columns(plan, concepts.slots)
    total = torch.zeros_like(q)
    for c, (k, v, slots, rivals) in enumerate(zip(concepts.keys, concepts.values, concepts.slots, concepts.competing)):
        m = attention.concept_maps(q, k, scale=scale, sink_lse=sink_lse, anchor_keys=rivals)  # (B, h, N, T_c)
        if plan.concept_map == "calibrated":
            assert level is not None
            m = torch.relu(m - level[..., None])
        elif plan.concept_map == "gated":
            assert level is not None
            share = m[..., own_cols[c]].mean(-1)  # (B, h, N)
            m = m * (share.mean(1) > level.mean(1)).to(m.dtype)[:, None, :, None]
        elif plan.concept_map == "output":
            assert gates is not None, "output maps need each concept's gate from the site"
            m = m * gates[c].to(m.dtype)[:, None, :, None]
        w = scales[..., c, slots].to(m.device, torch.float32)  # (T_c,) or (B, T_c)
        m = m * (w if w.ndim == 1 else w[:, None, None, :])
        total += (m.to(v.dtype) @ attention.rows_of(v, b)).to(q.dtype)
    return total


def act(
    q: torch.Tensor, concepts: ConceptKeys, ctx: StepContext, plan: Plan, *, scale: float,
    sink_lse: torch.Tensor | None, slice_size: int | None = None, references: ReferenceKeys | None = None,
    gates: list[torch.Tensor] | None = None,
) -> SiteResult:
    """Measure, observe and inhibit for image queries ``q`` ``(B_rows, h, N, d)`` of the rows
    that carry the prompt; ``sink_lse`` ``(B_rows, h, N)`` or None (the concept's own softmax).
    ``references`` (calibrated and gated maps) and ``gates`` (output maps: per concept
    ``(B_rows, N)``) as the plan's map rule needs."""
    measured = maps_out = delta = None
    keys = concepts.keys
    if ctx.measure or ctx.observe:
        maps = [attention.concept_maps(q, k, scale=scale, sink_lse=sink_lse, anchor_keys=a)
                for k, a in zip(keys, concepts.competing)]
        if ctx.measure:
            # adapters and presence thresholds read the concept's map as if it had no anchors
            plain = attention.maps_without_anchors(q, keys, concepts.competing, maps, scale=scale, sink_lse=sink_lse)
            measured = to_plan_slots(plan, [m.mean(dim=(1, 2)) for m in plain], concepts.slots)
        if ctx.observe:  # the share of each pixel's (inhibiting) map on the concept's own tokens
            maps_out = [m[..., cols].sum(-1) for m, cols in zip(maps, own_columns(plan, concepts.slots))]
    if ctx.inhibit and plan.concept_map != "gie":
        delta = specific_inhibitor(q, concepts, ctx.scales_for(q.shape[0]), plan, scale=scale, sink_lse=sink_lse,
                                   references=references, gates=gates)
    elif ctx.inhibit:
        scales = ctx.scales_for(q.shape[0])
        with_w = [(k, v, scales[..., c, slots], a)
                  for c, (k, v, slots, a) in enumerate(zip(keys, concepts.values, concepts.slots, concepts.competing))]
        delta = attention.inhibitor(q, with_w, scale=scale, sink_lse=sink_lse, slice_size=slice_size)
    return SiteResult(delta=delta, measured=measured, maps=maps_out)
