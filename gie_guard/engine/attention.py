"""The attention maths of growth inhibitors, as pure functions on tensors.

Used by the engine's attention sites (splitting heads, the prompt's masked normaliser,
anchors' projection); nothing here knows a pipeline or a module. :func:`inhibitor` and
:func:`concept_maps` are the per-concept form of the maths below, one concept at a time: the
engine runs the same maths stacked over all of a site's concepts (inhibition.act), and these
serve as its reference (tests, benchmarks/wrap_vs_fork.py).

Shapes: ``q`` is ``(B, h, N, d)`` (B rows, h heads, N queries, d per head); a concept is
keys and values ``(h, T, d)`` shared by the rows, or ``(B, h, T, d)`` per row (a joint block's
text stream differs per row), and scales ``(T,)`` or per row ``(B, T)`` (w per token slot;
0 on slots that are not the concept's own tokens).

For one concept ``c``, GIE (eq. 6-8, additive form) subtracts from the layer's attention
output

    I_c = sum_j w_j * M_c[..., j] * V_c[j],     M_c = softmax(q K_c^T * scale)

where the softmax runs over the concept's own encoding. ``sink_lse`` adds a sink to that
softmax: keys outside the concept that compete for the same queries (the image tokens of a
joint-attention block), given by the log of their summed exponentials per query. Then

    M_c[j] = exp(s_j) / (exp(sink_lse) + sum_k exp(s_k))

and ``I_c = sigmoid(lse_c - sink_lse) * softmax_c(s) @ (w * V_c)``: one attention over
the concept's keys plus a per-query gate, never a pass over the sink's keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ConceptKV",
    "attend",
    "attend_with_lse",
    "concept_maps",
    "inhibitor",
    "masked_lse",
    "project_off",
    "rows_of",
    "split_heads",
]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: torch.Tensor | None = None,
    slice_size: int | None = None,
) -> torch.Tensor:
    """Softmax attention ``(B, h, N, d)``; in chunks of ``slice_size`` (row x head) pairs when
    asked (the memory bound of diffusers' attention slicing)."""
    if not slice_size:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    b, h, n, _ = q.shape
    qq, kk, vv = (t.expand(b, h, *t.shape[2:]).reshape(b * h, *t.shape[2:]) for t in (q, k, v))
    mm = None if mask is None else mask.expand(b, h, n, mask.shape[-1]).reshape(b * h, n, -1)
    out = qq.new_empty(b * h, n, vv.shape[-1])
    for i in range(0, b * h, slice_size):
        j = slice(i, i + slice_size)
        out[j] = F.scaled_dot_product_attention(qq[j], kk[j], vv[j], attn_mask=None if mm is None else mm[j], scale=scale)
    return out.view(b, h, n, -1)


def attend_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and the log of each query's normaliser: ``(B, h, N, d)``, ``(B, h, N)``
    (float32), exact, in chunks of queries. Used over a concept's few keys (a handful per
    concept), never over the prompt's: the prompt's attention runs through the model's own
    attention backend (joint.py)."""
    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    for i in range(0, q.shape[2], chunk):
        logits = (q[:, :, i : i + chunk] @ k.transpose(-1, -2)).float() * scale  # (B, h, n, T)
        lse = torch.logsumexp(logits, dim=-1)
        outs.append((torch.exp(logits - lse[..., None]) @ v.float()).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def split_heads(x: torch.Tensor, heads: int, norm: Any = None, norm_place: str = "heads") -> torch.Tensor:
    """``(B, S, heads * d)`` -> ``(B, heads, S, d)``, with a q/k norm applied where the layer's
    processor applies it: "heads" (per head, after the split) or "inner" (before it)."""
    if norm_place == "inner" and norm is not None:
        x = norm(x)
    x = x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)
    if norm_place == "heads" and norm is not None:
        x = norm(x)
    return x


# an additive mask at or below this is diffusers' "masked" (-10000, or -inf): exp() of it is 0
# in float32 next to any real logit, so such columns can be left out of a normaliser exactly
_MASKED = -1e4


def masked_lse(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, *, scale: float, chunk: int = 1024) -> torch.Tensor:
    """log of each query's normaliser in ``softmax(q k^T * scale + mask)``: ``(B, h, N)``
    float32. ``mask``: None, boolean (True keeps) or additive, ``(B, T)`` or ``(B, 1 | N, T)``.
    Key columns masked for every row and query are skipped, which is exact and cheap for a
    padded prompt (PixArt: a few real tokens of 300 slots)."""
    bias = None
    if mask is not None:
        bias = mask.float() if mask.dtype != torch.bool else torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
        bias = bias[:, None] if bias.ndim == 3 else bias[:, None, None]  # (B, 1, 1 | N, T)
        live = (bias > _MASKED).flatten(0, -2).any(dim=0).nonzero().flatten()
        if live.numel() < k.shape[-2]:
            k, bias = k[..., live, :], bias[..., live]
    lses = []
    for i in range(0, q.shape[2], chunk):
        logits = (q[:, :, i : i + chunk] @ k.transpose(-1, -2)).float() * scale  # (B, h, n, T_live)
        if bias is not None:
            logits = logits + (bias if bias.shape[-2] == 1 else bias[..., i : i + chunk, :])
        lses.append(torch.logsumexp(logits, dim=-1))
    return torch.cat(lses, dim=2)


def rows_of(x: torch.Tensor, b: int) -> torch.Tensor:
    """``(h, T, ...)`` or ``(B, h, T, ...)`` -> ``(B, h, T, ...)`` (a view when expanded)."""
    return x[None].expand(b, *x.shape) if x.ndim == 3 else x


# one concept: keys and values (h, T, d) or per row (B, h, T, d), scales (T,) or per row (B, T),
# and optionally the keys of preservation anchors that compete for the same queries (h, n, d)
# (keys, values, w) or (keys, values, w, anchor_keys)
ConceptKV = (
    tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]
)


def project_off(values: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``values`` with their component in the span of ``basis`` removed, per head:
    ``(..., h, T, d)`` and ``(..., h, n, d)`` (n anchor value rows). The inhibitor then
    subtracts nothing an anchor's values can express."""
    if basis.shape[-2] == 0:
        return values
    q, _ = torch.linalg.qr(basis.float().transpose(-1, -2))  # (..., h, d, n): orthonormal columns
    v = values.float()
    projected: torch.Tensor = (v - (v @ q) @ q.transpose(-1, -2)).to(values.dtype)
    return projected


def centre_off(values: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``values`` ``(..., h, T, d)`` minus the mean of the anchors' value rows ``(..., h, n, d)``,
    per head: what is left points from the anchors' centroid to the concept, so the inhibitor
    removes what tells the concept from its anchors ("red" rather than "a colour") and keeps
    its strength along that direction, where ``project_off`` takes away the whole span."""
    if anchors.shape[-2] == 0:
        return values
    centred: torch.Tensor = (values.float() - anchors.float().mean(dim=-2, keepdim=True)).to(values.dtype)
    return centred


def inhibitor(
    q: torch.Tensor,
    concepts: Sequence[ConceptKV],
    *,
    scale: float,
    sink_lse: torch.Tensor | None = None,
    slice_size: int | None = None,
) -> torch.Tensor:
    """``sum_c I_c`` for queries ``q`` ``(B, h, N, d)``: each concept in its own softmax
    (optionally with a sink), its values scaled per token slot. Returns ``(B, h, N, d)``.
    One attention per concept: the query is never copied."""
    b = q.shape[0]
    total = torch.zeros_like(q)
    for keys, values, w, *anchors in concepts:
        w = w.to(device=values.device, dtype=values.dtype)
        v = values * (w[:, None] if w.ndim == 1 else w[:, None, :, None])  # zero rows on slots without w
        k, v = rows_of(keys, b), rows_of(v, b)
        if anchors and anchors[0] is not None and anchors[0].shape[-2]:  # anchors take their share, add nothing
            ka = rows_of(anchors[0], b)
            k = torch.cat([k, ka], dim=2)
            v = torch.cat([v, v.new_zeros(*ka.shape[:-1], v.shape[-1])], dim=2)
        if sink_lse is None:
            total += attend(q, k, v, scale=scale, slice_size=slice_size)
        else:
            out, lse = attend_with_lse(q, k, v, scale=scale)
            total += torch.sigmoid(lse - sink_lse)[..., None].to(out.dtype) * out
    return total


def concept_maps(
    q: torch.Tensor, keys: torch.Tensor, *, scale: float, sink_lse: torch.Tensor | None = None,
    anchor_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """One concept's attention map ``M_c``: ``(B, h, N, T)`` float32 (its own softmax over its
    T slots, with the sink's and the anchors' shares taken out when given)."""
    b = q.shape[0]
    logits = (q.float() @ rows_of(keys, b).float().transpose(-1, -2)) * scale
    total = torch.logsumexp(logits, dim=-1)
    if anchor_keys is not None and anchor_keys.shape[-2]:
        anchor_logits = (q.float() @ rows_of(anchor_keys, b).float().transpose(-1, -2)) * scale
        total = torch.logaddexp(total, torch.logsumexp(anchor_logits, dim=-1))
    if sink_lse is not None:
        total = torch.logaddexp(total, sink_lse.float())
    return torch.exp(logits - total[..., None])
