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
from .concept_stack import ConceptKeys, stack_references
from .context import StepContext

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["ConceptKeys", "ReferenceKeys", "SiteResult", "act", "anchor_effects"]


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
        compete = plan.preserve in ("compete", "both")
        competing.append(torch.cat([anchor_keys[a] for a in mine], dim=-2) if compete else None)
        theirs = torch.cat([anchor_values[a] for a in mine], dim=-2)
        spared.append(v if plan.preserve == "compete" else attention.centre_off(v, theirs)
                      if plan.preserve == "centroid" else attention.project_off(v, theirs))
    return competing, spared


# the float32 logits of one chunk of concepts stay under this (more concepts: more chunks)
CHUNK_BYTES = 64 * 2**20


def own_scales(scales: torch.Tensor, concepts: ConceptKeys) -> torch.Tensor:
    """w at each concept's own tokens: ``(C, n)``, or per row ``(B, C, n)``, 0 on padding.
    Scales live on own tokens only (the plan and the adapters put them there); a scale source
    that puts one anywhere else cannot be reproduced here and fails the call."""
    c = torch.arange(concepts.count, device=scales.device)[:, None]
    slots = concepts.own_slots.to(scales.device)
    valid = concepts.own_valid.to(scales.device)
    w = (scales[c, slots] if scales.ndim == 2 else scales[:, c, slots]) * valid
    if not torch.allclose(w.abs().sum(), scales.abs().sum(), rtol=1e-5, atol=0.0):
        raise ValueError("a scale on a slot that is not one of its concept's own tokens")
    return w


def _logits(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """``q`` ``(B, h, N, d)`` float32 against a chunk of keys ``(c, h, T, d)`` or
    ``(c, B, h, T, d)``: ``(B, h, N, c, T)`` float32, one matrix product."""
    b, h, n, _ = q.shape
    c, t = keys.shape[0], keys.shape[-2]
    if keys.ndim == 4:
        k = keys.permute(1, 0, 2, 3).reshape(h, c * t, -1)
    else:
        k = keys.permute(1, 2, 0, 3, 4).reshape(b, h, c * t, -1)
    return (q @ k.float().transpose(-1, -2)).mul_(scale).view(b, h, n, c, t)


def _merged(part: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """Own-token values ``(c, h, n, d)`` / ``(c, B, h, n, d)`` as ``(h | B h, c * n, d)``,
    the right-hand side of ``map (B, h, N, c * n) @ values``."""
    if part.ndim == 4:
        return part.permute(1, 0, 2, 3).reshape(part.shape[1], -1, part.shape[-1]).to(chunk.dtype)
    return part.permute(1, 2, 0, 3, 4).reshape(part.shape[1], part.shape[2], -1, part.shape[-1]).to(chunk.dtype)


def _own_maps(q: torch.Tensor, part: ConceptKeys, *, scale: float, sink: torch.Tensor | None,
              sums: torch.Tensor | None = None) -> torch.Tensor:
    """Each concept's map at its own tokens, ``(B, h, n_q, c, n)`` float32 (0 on padding):
    its softmax over its T columns, the sink's share and its competing anchors' taken out.
    ``sums`` ``(B, c, T)``: adds each column's map summed over heads and queries, as if the
    concept had no anchors (what adapters and presence thresholds read)."""
    b, h = q.shape[:2]
    logits = _logits(q, part.keys, scale)  # (B, h, n_q, c, T)
    if part.key_valid is not None:
        logits.masked_fill_(~part.key_valid, float("-inf"))
    # one exp pass, in place: e = exp(s - top), z = the softmax's normaliser times exp(-top)
    top = logits.amax(dim=-1)  # (B, h, n_q, c)
    if sink is not None:
        top = torch.maximum(top, sink[..., None])
    e = logits.sub_(top[..., None]).exp_()
    z = e.sum(dim=-1)
    if sink is not None:
        z += torch.exp(sink[..., None] - top)
    if sums is not None:
        sums += (e / z[..., None]).sum(dim=(1, 2))
    m = e.gather(-1, part.own.expand(b, h, e.shape[2], *part.own.shape))  # (B, h, n_q, c, n)
    del logits, e
    if part.competing is not None:  # the anchors join the normaliser, under a common top
        assert part.competing_valid is not None
        rivals = _logits(q, part.competing, scale).masked_fill_(~part.competing_valid, float("-inf"))
        joint = torch.maximum(top, rivals.amax(dim=-1))
        shift = torch.exp(top - joint)
        z = z * shift + torch.exp(rivals - joint[..., None]).sum(dim=-1)
        m = m * shift[..., None]
    return m / z[..., None] * part.own_valid


def act(
    q: torch.Tensor, concepts: ConceptKeys, ctx: StepContext, plan: Plan, *, scale: float,
    sink_lse: torch.Tensor | None, references: ReferenceKeys | None = None,
    gates: list[torch.Tensor] | None = None, chunk_bytes: int = CHUNK_BYTES,
) -> SiteResult:
    """Measure, observe and inhibit for image queries ``q`` ``(B_rows, h, N, d)`` of the rows
    that carry the prompt; ``sink_lse`` ``(B_rows, h, N)`` or None (the concept's own softmax).
    ``references`` (calibrated and gated maps) and ``gates`` (output maps: per concept
    ``(B_rows, N)``) as the plan's map rule needs.

    The inhibitor is ``sum_c sum_j w_j A_c[..., j] V_c[j]`` over the own tokens j of each
    concept c, ``A_c`` its map under the plan's rule (plan.ConceptMap); it runs over chunks of
    concepts (and of queries) whose float32 logits stay under ``chunk_bytes``."""
    measure, observe, inhibit = ctx.measure, ctx.observe, ctx.inhibit
    if not (measure or observe or inhibit):
        return SiteResult(delta=None, measured=None, maps=None)
    b, h, n, _ = q.shape
    rule = plan.concept_map
    w = own_scales(ctx.scales_for(b), concepts) if inhibit else None  # (C, n) or (B, C, n)
    refs = None  # what a word that names nothing in particular gets (calibrated and gated maps)
    if inhibit and rule in ("calibrated", "gated", "contrast"):
        assert references is not None, "calibrated, gated and contrast maps need references"
        refs = stack_references(references.keys, references.own)
    if inhibit and rule == "output":
        assert gates is not None, "output maps need each concept's gate from the site"
    per_query = b * h * concepts.columns * 4  # bytes of one concept's logits per query
    rows_of_queries = max(1, min(n, chunk_bytes // per_query))
    size = max(1, chunk_bytes // (per_query * rows_of_queries))
    qf = q.float()
    total = torch.zeros(b, h, n, concepts.values.shape[-1], dtype=torch.float32, device=q.device) if inhibit else None
    sums = torch.zeros(b, concepts.count, concepts.columns, dtype=torch.float32, device=q.device) if measure else None
    observed: list[list[torch.Tensor]] = [[] for _ in range(concepts.count)] if observe else []
    for lo in range(0, n, rows_of_queries):
        qs = qf[:, :, lo : lo + rows_of_queries]  # (B, h, n_q, d)
        sink = None if sink_lse is None else sink_lse[:, :, lo : lo + rows_of_queries].float()
        level = None
        if refs is not None:  # each reference's mean per-own-token map in its own softmax: (B, h, n_q, R)
            each = _own_maps(qs, refs, scale=scale, sink=sink).sum(-1) / refs.own_valid.sum(-1)
            level = each.amax(-1) if rule == "contrast" else each.mean(-1)  # (B, h, n_q)
        for first, part in zip(range(0, concepts.count, size), concepts.chunks(size)):
            c = slice(first, first + part.count)
            m = _own_maps(qs, part, scale=scale, sink=sink, sums=None if sums is None else sums[:, c])
            if observe:  # the share of each pixel's (inhibiting) map on the concept's own tokens
                for i, share in enumerate(m.sum(-1).unbind(3)):
                    observed[first + i].append(share)
            if not inhibit:
                continue
            assert w is not None and total is not None
            if rule in ("calibrated", "contrast"):
                assert level is not None
                m = torch.relu(m - level[..., None, None])
            elif rule == "gated":
                assert level is not None
                share = m.sum(-1) / part.own_valid.sum(-1).clamp_min(1)  # (B, h, n_q, c)
                m = m * (share.mean(1) > level.mean(1)[..., None]).to(m.dtype)[:, None, :, :, None]
            elif rule == "output":
                assert gates is not None
                open_ = torch.stack([g[:, lo : lo + rows_of_queries] for g in gates[c]], dim=-1)  # (B, n_q, c)
                m = m * open_.to(m.dtype)[:, None, :, :, None]
            wc = w[c] if w.ndim == 2 else w[:, c][:, None, None]  # (c, n) or (B, 1, 1, c, n)
            m = (m * wc).flatten(-2)  # (B, h, n_q, c * n)
            total[:, :, lo : lo + rows_of_queries] += m @ _merged(part.values, m)
    measured = None
    if sums is not None:  # (rows, C, T) over the plan's slots, 0 elsewhere (padding adds 0)
        assert plan.token_scales is not None
        measured = torch.zeros(b, *plan.token_scales.shape, dtype=torch.float32, device=q.device)
        index = concepts.key_slots.expand(b, *concepts.key_slots.shape)
        measured = measured.scatter_add_(-1, index, sums / (h * n)).cpu()
    maps = [torch.cat(parts, dim=2) for parts in observed] if observe else None
    return SiteResult(delta=None if total is None else total.to(q.dtype), measured=measured, maps=maps)
