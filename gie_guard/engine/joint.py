"""Growth inhibitors in joint-attention blocks (SD3/SD3.5 MM-DiT, Flux double and single stream).

There is no cross-attention in these models: each block runs one softmax over image and
text tokens, and the text stream changes from block to block. The engine carries each
concept's tokens *along* with the prompt (the family appends them to the text sequence
given to the transformer, for the steps in the window), so every block updates them with
its own text-stream weights. Inside a block this processor keeps three attentions apart:

- the prompt: image and prompt-text queries over image and prompt-text keys, exactly the
  block's own attention (the concept tokens are invisible to it);
- each concept's tokens: their queries over the image keys and their own keys, as if the
  concept were the prompt of this image;
- the inhibitor, for the image queries of the rows that carry the prompt:

      M_c[j] = exp(q.k_j) / (Z_sink + sum_{k in concept c} exp(q.k_k)),
      O_image' = O_image - sum_c sum_j w_j M_c[j] v_j

  with the **image keys as the sink** (``Z_sink`` = the sum over image keys, what a query
  would spend on the image had the concept been the prompt), or, with ``sink="prompt"``,
  the prompt's whole joint softmax (image and prompt-text keys) as the sink.

The prompt's attention is computed as two partial attentions (over image keys, over
prompt-text keys) merged exactly; the image part's log-normaliser is the sink. Outside the
window the block's own processor runs untouched.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch

from . import attention

if TYPE_CHECKING:
    from .call import EngineCall
    from .families.base import Site

__all__ = ["JointInhibitorProcessor", "joint_processor_classes", "project_heads"]


def joint_processor_classes() -> set[type]:
    """Processors whose attention this module reproduces exactly (by class identity)."""
    from diffusers.models import attention_processor as ap

    classes: set[type] = {ap.JointAttnProcessor2_0}
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        classes.add(FluxAttnProcessor)
    except ImportError:  # pragma: no cover - older diffusers
        pass
    return classes


def _rope(x: torch.Tensor, rotary: Any) -> torch.Tensor:
    """Flux's rotary embedding on ``(B, S, h, d)``."""
    from diffusers.models.embeddings import apply_rotary_emb

    rotated: torch.Tensor = apply_rotary_emb(x, rotary, sequence_dim=1)
    return rotated


def project_heads(attn: Any, x: torch.Tensor, added: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value ``(..., S, h, d)`` of ``x`` ``(..., S, D)`` as the block projects
    them, with its norms: the text stream's (``add_*_proj``) when ``added``, else the image's."""
    if added:
        q, k, v = attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
        nq, nk = attn.norm_added_q, attn.norm_added_k
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        nq, nk = attn.norm_q, attn.norm_k
    d = k.shape[-1] // attn.heads
    q, k, v = (t.unflatten(-1, (-1, d)) for t in (q, k, v))
    if nq is not None:
        q = nq(q)
    if nk is not None:
        k = nk(k)
    return q, k, v


class JointInhibitorProcessor:
    """Replaces one joint-attention site's processor for the length of one call."""

    def __init__(self, original: Any, site: Site, call: EngineCall, row: int, *, text_first: bool) -> None:
        self.original = original
        self.site = site
        self.call = call
        self.row = row
        self.text_first = text_first  # Flux orders [text; image], SD3 [image; text]
        self.applied = 0

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        call = self.call
        if not call.riding(self.site):
            args = (attn, hidden_states, encoder_hidden_states, attention_mask)
            if image_rotary_emb is not None:
                return self.original(*args, image_rotary_emb, **kwargs)
            return self.original(*args, **kwargs)
        if attention_mask is not None:
            call.fail(f"{self.site.name}: an attention mask in a joint-attention block is not supported")
        started = time.perf_counter()
        out = self._guarded(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        call.add_seconds(time.perf_counter() - started)
        return out

    # -- the guarded block ---------------------------------------------------------------------
    def _guarded(self, attn: Any, hidden: torch.Tensor, text: torch.Tensor | None, rotary: Any) -> Any:
        call = self.call
        single = text is None  # Flux single-stream: hidden is [text; image] already
        t_all = call.text_length + call.concept_length  # prompt text + concept tokens
        if text is None:
            q, k, v = project_heads(attn, hidden, added=False)
        else:
            qi, ki, vi = project_heads(attn, hidden, added=False)
            qt, kt, vt = project_heads(attn, text, added=True)

            def cat(text_part: torch.Tensor, image_part: torch.Tensor) -> torch.Tensor:
                parts = [text_part, image_part] if self.text_first else [image_part, text_part]
                return torch.cat(parts, dim=1)

            q, k, v = cat(qt, qi), cat(kt, ki), cat(vt, vi)
        if rotary is not None:
            q, k = _rope(q, rotary), _rope(k, rotary)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, S, d)
        # token ranges in the sequence
        n_total = q.shape[2]
        if self.text_first or single:
            txt = slice(0, call.text_length)
            con = slice(call.text_length, t_all)
            img = slice(t_all, n_total)
        else:
            img = slice(0, n_total - t_all)
            txt = slice(n_total - t_all, n_total - call.concept_length)
            con = slice(n_total - call.concept_length, n_total)
        scale = 1.0 / math.sqrt(q.shape[-1])

        # 1. the prompt's own joint attention, as two partial attentions merged exactly
        keep = [img, txt] if not (self.text_first or single) else [txt, img]
        q_p = torch.cat([q[:, :, s] for s in keep], dim=2)
        o_img, lse_img = attention.attend_with_lse(q_p, k[:, :, img], v[:, :, img], scale=scale)
        o_txt, lse_txt = attention.attend_with_lse(q_p, k[:, :, txt], v[:, :, txt], scale=scale)
        o_p, lse_p = attention.merge_partial_attention([(o_img, lse_img), (o_txt, lse_txt)])
        n_img = img.stop - img.start
        img_q = slice(0, n_img) if keep[0] is img else slice(q_p.shape[2] - n_img, q_p.shape[2])
        txt_q = slice(n_img, q_p.shape[2]) if keep[0] is img else slice(0, q_p.shape[2] - n_img)

        # 2. the concept tokens of the rows that carry the prompt, over [image; own tokens]
        rows = call.rows
        o_con = q.new_zeros(q.shape[0], q.shape[1], call.concept_length, q.shape[3])
        k_img_r, v_img_r = k[rows, :, img], v[rows, :, img]
        per_concept = []
        for lo, hi in call.concept_spans:
            span = slice(con.start + lo, con.start + hi)
            kc, vc = k[rows, :, span], v[rows, :, span]
            o_con[rows, :, lo:hi] = attention.attend(
                q[rows, :, span], torch.cat([k_img_r, kc], dim=2), torch.cat([v_img_r, vc], dim=2), scale=scale
            )
            per_concept.append((kc, vc))

        # 3. the inhibitor on the image queries of those rows
        plan = call.plan
        q_img = q_p[rows, :, img_q]
        sink = (lse_img if call.sink == "image" else lse_p)[rows, :, img_q]
        slots = [list(s) for s in plan.ride_along]
        per_concept, per_anchor = per_concept[: len(slots)], per_concept[len(slots):]
        competing, spare = self._anchors(per_anchor)
        if call.measuring or call.observing:
            keys = [kc for kc, _ in per_concept]
            rivals = [competing(c) for c in range(len(keys))]
            maps = [attention.concept_maps(q_img, kc, scale=scale, sink_lse=sink, anchor_keys=a) for kc, a in zip(keys, rivals)]
            if call.measuring:
                # adapters and presence thresholds read the concept's map as if it had no anchors
                plain = attention.maps_without_anchors(q_img, keys, rivals, maps, scale=scale, sink_lse=sink)
                call.measured(self.site, call.to_plan_slots([m.mean(dim=(1, 2)) for m in plain], slots))
            if call.observing:  # the share of each pixel's (inhibiting) map on the concept's own tokens
                own = [[i for i, slot in enumerate(slots[c]) if slot in set(call.plan.token_positions[c])]
                       for c in range(len(slots))]
                call.observe(self.site, [m[..., cols].sum(-1) for m, cols in zip(maps, own)])
        o_img_p = o_p[:, :, img_q]
        if call.active:
            scales = call.scales_for(q_img.shape[0])
            with_w = [(kc, spare(c, vc), scales[..., c, slots[c]], competing(c)) for c, (kc, vc) in enumerate(per_concept)]
            delta = attention.inhibitor(q_img, with_w, scale=scale, sink_lse=sink)
            o_img_p = o_img_p.clone()
            delta = delta.to(o_img_p.dtype)
            o_img_p[rows] -= delta
            call.subtracted(delta)
            self.applied += 1

        # back to the block's layout: (B, S, h * d)
        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).flatten(2, 3).to(hidden.dtype)

        image_out, text_out = flat(o_img_p), flat(torch.cat([o_p[:, :, txt_q], o_con], dim=2))
        if single:
            return torch.cat([text_out, image_out], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        if not getattr(attn, "context_pre_only", False):
            text_out = attn.to_add_out(text_out)
        return image_out, text_out

    def _anchors(self, per_anchor: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, Any]:
        """(competing(c), spare(c, values)) for preservation anchors riding along after the concepts:
        an anchor's own tokens' keys join concept c's softmax, and/or its values leave c's values."""
        plan = self.call.plan
        own = [[i for i, slot in enumerate(carried) if slot in set(positions)]
               for carried, positions in zip(plan.anchor_ride_along, plan.anchor_positions)]
        keys = [k[:, :, cols] for (k, _), cols in zip(per_anchor, own)]
        values = [v[:, :, cols] for (_, v), cols in zip(per_anchor, own)]

        def competing(c: int) -> torch.Tensor | None:
            mine = plan.concept_anchors[c] if plan.concept_anchors else ()
            if not mine or plan.preserve == "project":
                return None
            return torch.cat([keys[a] for a in mine], dim=2)

        def spare(c: int, v: torch.Tensor) -> torch.Tensor:
            mine = plan.concept_anchors[c] if plan.concept_anchors else ()
            if not mine or plan.preserve == "compete":
                return v
            return attention.project_off(v, torch.cat([values[a] for a in mine], dim=2))

        return competing, spare
