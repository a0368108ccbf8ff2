"""Literal references of GIE, built by hand, for tests and benchmarks.

Each reference writes out the full attention matrix of one layer with the concepts'
columns inserted at weight ``-w`` (GIE eq. 8), row by row, with explicit softmaxes, under
the definition of ``M_c`` the engine states for that family (docs/families.md). The
engine must agree with them within 1e-5 relative; they are deliberately slow and plain.

``engine_layer`` runs one attention layer through the engine exactly as inside a guarded
denoising step, so a layer can be compared with its reference without a whole pipeline run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["engine_joint_block", "engine_layer", "flux_rotary", "joint_inputs", "literal_cross_attention", "literal_joint_attention"]


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(S, h*d) -> (h, S, d)"""
    return x.view(x.shape[0], heads, -1).transpose(0, 1)


@torch.no_grad()
def literal_cross_attention(
    attn: Any,
    hidden: torch.Tensor,
    text: torch.Tensor,
    concepts: Sequence[tuple[torch.Tensor, Sequence[int], torch.Tensor]],
    cond_rows: Sequence[int],
    insert_at: Sequence[int],
    *,
    sink: str = "own",
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One cross-attention layer (before ``to_out[1]``, after ``to_out[0]``) with GIE.

    ``concepts``: (encoding (T, D) as the layer receives text, own-token slots J, w over J).
    For rows in ``cond_rows`` the concept columns ``-w_j M_c[:, j]`` and values ``V_c[j]`` are
    inserted into the prompt's map at column ``insert_at[row]`` (before its end token).
    ``sink="own"``: ``M_c`` is the softmax over the concept's whole encoding (the paper's
    rule); ``"prompt"``: the concept's own tokens compete with the prompt's (unmasked)
    columns in one softmax. ``text_mask`` (B, T) marks the prompt's real slots."""
    heads = attn.heads
    rows = []
    for b in range(hidden.shape[0]):
        q = _split(attn.to_q(hidden[b]), heads)  # (h, N, d)
        d = q.shape[-1]
        kp, vp = _split(attn.to_k(text[b]), heads), _split(attn.to_v(text[b]), heads)
        logits = q @ kp.transpose(-1, -2) / math.sqrt(d)  # (h, N, T)
        if text_mask is not None:
            logits = logits.masked_fill(~text_mask[b].bool(), float("-inf"))
        maps, values = torch.softmax(logits, dim=-1), vp
        if b in cond_rows:
            at = insert_at[b]
            for enc, own, w in concepts:
                kc, vc = _split(attn.to_k(enc), heads), _split(attn.to_v(enc), heads)
                lc = q @ kc.transpose(-1, -2) / math.sqrt(d)  # (h, N, T_c)
                j = list(own)
                if sink == "own":
                    mc = torch.softmax(lc, dim=-1)[..., j]
                else:
                    both = torch.cat([logits, lc[..., j]], dim=-1)
                    mc = torch.softmax(both, dim=-1)[..., logits.shape[-1]:]
                maps = torch.cat([maps[..., :at], -w * mc, maps[..., at:]], dim=-1)
                values = torch.cat([values[:, :at], vc[:, j], values[:, at:]], dim=1)
        o = (maps @ values).transpose(0, 1).reshape(q.shape[1], -1)
        rows.append(attn.to_out[0](o))
    return torch.stack(rows)


@torch.no_grad()
def literal_joint_attention(
    attn: Any,
    image: torch.Tensor,
    text: torch.Tensor,
    concept_states: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cond_rows: Sequence[int],
    *,
    single: bool = False,
    rotary: Any = None,
    sink: str = "image",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One joint-attention block with GIE, by hand: the image tokens' attention outputs
    (before ``to_out``) and, per concept, its carried tokens' outputs.

    ``image`` (B, N, D) and ``text`` (B, T, D) are the block's normed inputs; ``single``: a
    Flux single-stream block (text projected by the same weights as the image). Per concept,
    ``concept_states`` holds its carried tokens' states at this block (B, T_c, D) and w over
    them (T_c,). For prompt rows the image queries' map over ``[image keys; prompt keys]``
    gets each concept's columns at weight ``-w M_c``, with ``M_c = exp(s_c) / (Z_sink + Z_c)``
    where the sink is the image keys (``sink="image"``) or image and prompt keys
    (``"prompt"``); each concept's own tokens attend over ``[image keys; their own keys]``.
    ``rotary`` (Flux): cos/sin over ``[prompt; concepts; image]`` positions."""

    def project(x: torch.Tensor, text_side: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S, D) -> q, k, v (S, h, d), written out here rather than taken from the engine, so a
        mix-up of projections or norms there (norm_q on keys, the image norms on the text
        stream) shows as a difference."""
        added = text_side and not single
        to_q, to_k, to_v = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if added else (attn.to_q, attn.to_k, attn.to_v)
        norm_q = attn.norm_added_q if added else attn.norm_q
        norm_k = attn.norm_added_k if added else attn.norm_k
        q, k, v = to_q(x), to_k(x), to_v(x)
        q, k, v = (t.view(t.shape[0], attn.heads, -1) for t in (q, k, v))
        if norm_q is not None:
            q = norm_q(q)
        if norm_k is not None:
            k = norm_k(k)
        return q, k, v

    def rope(x: torch.Tensor, at: slice) -> torch.Tensor:
        if rotary is None:
            return x
        from diffusers.models.embeddings import apply_rotary_emb

        cos, sin = rotary
        rotated: torch.Tensor = apply_rotary_emb(x[None], (cos[at], sin[at]), sequence_dim=1)
        return rotated[0]

    n, t = image.shape[1], text.shape[1]
    t_c = [c.shape[1] for c, _ in concept_states]
    img_at = slice(t + sum(t_c), t + sum(t_c) + n)
    out_image: list[torch.Tensor] = []
    out_concepts: list[list[torch.Tensor]] = [[] for _ in concept_states]
    for b in range(image.shape[0]):
        qi, ki, vi = project(image[b], text_side=False)
        qt, kt, vt = project(text[b], text_side=True)
        qi, ki = rope(qi, img_at), rope(ki, img_at)
        qt, kt = rope(qt, slice(0, t)), rope(kt, slice(0, t))
        qi, ki, vi, qt, kt, vt = (x.transpose(0, 1) for x in (qi, ki, vi, qt, kt, vt))  # (h, S, d)
        d = qi.shape[-1]
        keys, values = torch.cat([ki, kt], dim=1), torch.cat([vi, vt], dim=1)
        logits = qi @ keys.transpose(-1, -2) / math.sqrt(d)  # (h, N, N + T)
        maps = torch.softmax(logits, dim=-1)
        at = n
        for c, (states, w) in enumerate(concept_states):
            qc, kc, vc = project(states[b], text_side=True)
            lo = t + sum(t_c[:c])
            qc, kc = rope(qc, slice(lo, lo + t_c[c])), rope(kc, slice(lo, lo + t_c[c]))
            qc, kc, vc = (x.transpose(0, 1) for x in (qc, kc, vc))
            own = torch.softmax(qc @ torch.cat([ki, kc], dim=1).transpose(-1, -2) / math.sqrt(d), dim=-1)
            out_concepts[c].append((own @ torch.cat([vi, vc], dim=1)).transpose(0, 1).reshape(t_c[c], -1))
            if b in cond_rows:
                lc = qi @ kc.transpose(-1, -2) / math.sqrt(d)
                sink_logits = logits[..., :n] if sink == "image" else logits
                mc = torch.exp(lc - torch.logsumexp(torch.cat([sink_logits, lc], dim=-1), dim=-1, keepdim=True))
                maps = torch.cat([maps[..., :at], -w * mc, maps[..., at:]], dim=-1)
                values = torch.cat([values[:, :at], vc, values[:, at:]], dim=1)
                at += t_c[c]
        out_image.append((maps @ values).transpose(0, 1).reshape(n, -1))
    return torch.stack(out_image), [torch.stack(o) for o in out_concepts]


@contextlib.contextmanager
def engine_layer(
    pipe: Any, plan: Any, rows: Sequence[int], *, active: bool = True, text_length: int | None = None,
    scales: torch.Tensor | None = None,
) -> Iterator[Any]:
    """Inside the block, direct calls of ``pipe``'s attention layers run through the engine as
    in a guarded denoising step whose prompt rows are ``rows`` (measuring at step 0), through
    the coordinator's public seam (``EngineCall.layer_context``). Joint families: the caller
    appends the carried tokens after ``text_length`` prompt tokens."""
    from ..engine.coordinator import EngineCall

    call = EngineCall(pipe, plan)
    call.install()
    try:
        with call.layer_context(rows, inhibit=active, measure=True, text_length=text_length, scales=scales):
            yield call
    finally:
        call.remove()


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` (Frobenius norms), the measure the engine's tests bound."""
    return float((got - want).norm() / want.norm())


class ZeroScales:
    """A scale source (gie_guard.engine.ScaleSource) of zero scales at call time: the plan's
    concepts still ride along and are computed, at w = 0 (checks that carrying them changes
    nothing)."""

    probe = False

    def __init__(self, plan: Any) -> None:
        self.plan = plan

    def scales(self, step: int, measured: Any) -> torch.Tensor:
        return torch.zeros_like(self.plan.token_scales)


def random_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every q/k norm weight of ``model``'s attention layers drawn from U(0.5, 1.5), in place:
    the tiny pipelines' norms are all ones, under which norm_q and norm_k are interchangeable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1].startswith("norm_") and getattr(module, "weight", None) is not None:
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=g))
    return model


def joint_inputs(
    attn: Any, plan: Any, *, n: int = 12, t: int = 20, rows: int = 2, seed: int = 0, single: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Random inputs of one joint-attention block for ``engine_layer`` comparisons: image
    ``(rows, n, D)``, prompt text ``(rows, t, D_text)``, per concept its carried tokens' states
    ``(rows, T_c, D_text)`` and w over them ``(T_c,)``."""
    g = torch.Generator().manual_seed(seed)
    width = attn.to_q.in_features
    text_width = width if single else attn.add_q_proj.in_features
    image = torch.randn(rows, n, width, generator=g)
    text = torch.randn(rows, t, text_width, generator=g)
    states = [torch.randn(rows, len(s), text_width, generator=g) for s in plan.ride_along]
    weights = [plan.token_scales[c, list(s)] for c, s in enumerate(plan.ride_along)]
    return image, text, states, weights


def flux_rotary(pipe: Any, t_total: int, n: int) -> Any:
    """Flux's rotary embedding for ``t_total`` text tokens (position ids 0, as the prompt's)
    and ``n`` image tokens on a square grid."""
    side = int(n**0.5)
    img = torch.stack([torch.zeros(n), torch.arange(n) // side, torch.arange(n) % side], dim=-1).float()
    return pipe.transformer.pos_embed(torch.cat([torch.zeros(t_total, 3), img]))


@torch.no_grad()
def engine_joint_block(
    pipe: Any, plan: Any, attn: Any, image: torch.Tensor, text: torch.Tensor, states: Sequence[torch.Tensor],
    rows: Sequence[int], *, single: bool = False, rotary: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One joint-attention block through the engine (``engine_layer``) with the concepts'
    carried ``states`` appended to the prompt ``text``: the image tokens' output and the text
    sequence's (prompt, then concept tokens). ``single``: a Flux single-stream block."""
    t_all = text.shape[1] + sum(s.shape[1] for s in states)
    extra = {} if rotary is None else {"image_rotary_emb": rotary}
    with engine_layer(pipe, plan, rows=rows, text_length=text.shape[1]):
        if single:
            out = attn(hidden_states=torch.cat([text, *states, image], dim=1), **extra)
            return out[:, t_all:], out[:, :t_all]
        got_image, got_text = attn(hidden_states=image, encoder_hidden_states=torch.cat([text, *states], dim=1), **extra)
        return got_image, got_text
