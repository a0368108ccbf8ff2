"""Growth inhibitors in joint-attention blocks (SD3/SD3.5 MM-DiT, Flux double and single stream).

There is no cross-attention in these models: each block runs one softmax over image and
text tokens, and the text stream changes from block to block. The engine carries each
concept's tokens *along* with the prompt (the family appends them to the text sequence
given to the transformer, for the steps in the window), so every block updates them with
its own text-stream weights. Inside a block the guarded processor keeps three attentions apart:

- the prompt: image and prompt-text queries over image and prompt-text keys, exactly the
  block's own attention (the concept tokens are invisible to it), run through diffusers'
  ``dispatch_attention_fn`` with the backend the block's processor carries
  (``set_attention_backend``), so the user's attention backend runs inside the window too;
- each concept's tokens: their queries over the image keys and their own keys, as if the
  concept were the prompt of this image;
- the inhibitor, for the image queries of the rows that carry the prompt:

      M_c[j] = exp(q.k_j) / (Z_sink + sum_{k in concept c} exp(q.k_k)),
      O_image' = O_image - sum_c sum_j w_j M_c[j] v_j

  with the **image keys as the sink** (``Z_sink`` = the sum over image keys, what a query
  would spend on the image had the concept been the prompt), or, with ``sink="prompt"``,
  the prompt's whole joint softmax (image and prompt-text keys) as the sink. ``log Z_sink``
  is computed for those queries only (one product with the sink's keys, no softmax over them).

Outside the window the block's own processor runs untouched; inside it, rows that do not
carry the prompt get the block's own attention through the same backend.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from . import attention, inhibition
from .sites import Site, SiteOutcome, SiteState, processor_name

if TYPE_CHECKING:
    from .context import CallShared, RideAlong, StepContext

__all__ = ["JointHandler", "JointInhibitorProcessor", "project_heads"]


def project_heads(attn: Any, x: torch.Tensor, added: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value ``(B, h, S, d)`` of ``x`` ``(B, S, D)`` as the block projects
    them, with its per-head norms: the text stream's (``add_*_proj``) when ``added``, else the image's."""
    if added:
        q, k, v = attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
        nq, nk = attn.norm_added_q, attn.norm_added_k
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        nq, nk = attn.norm_q, attn.norm_k
    return (attention.split_heads(q, attn.heads, nq), attention.split_heads(k, attn.heads, nk),
            attention.split_heads(v, attn.heads))


def _rope(x: torch.Tensor, rotary: Any) -> torch.Tensor:
    """Rotary positions on ``(B, h, S, d)`` (Flux passes them as ``image_rotary_emb``)."""
    from diffusers.models.embeddings import apply_rotary_emb

    rotated: torch.Tensor = apply_rotary_emb(x, rotary, sequence_dim=2)
    return rotated


class JointHandler:
    """Guards joint-attention blocks whose processor's class is in ``processors()`` (the
    family's: diffusers' SD3 or Flux processor), in the sequence order the family uses."""

    def __init__(self, processors: Callable[[], set[type]], *, text_first: bool) -> None:
        self._processors = processors
        self._classes: set[type] | None = None
        self.text_first = text_first  # [text; image] (Flux) or [image; text] (SD3)

    def accepts(self, processor: Any) -> bool:
        if self._classes is None:
            self._classes = set(self._processors())
        return type(processor) in self._classes

    def refusal(self, site: Site) -> str | None:
        processor = site.module.processor
        if not self.accepts(processor):
            return (f"its processor {processor_name(processor)} is not one gie_guard can reproduce (IP-Adapters on "
                    "transformer backbones, custom processors and unsupported fused projections are refused; reset "
                    "with set_default_attn_processor())")
        if getattr(processor, "_parallel_config", None) is not None:
            return "it runs context-parallel attention, which splits the sequence the concept tokens ride in"
        return None

    def install(self, site: Site, shared: CallShared, report: Callable[[SiteOutcome], None]) -> JointSite:
        return JointSite(self, site, shared, report)


class JointSite:
    """One joint block's processor, replaced for the length of one call."""

    def __init__(self, handler: JointHandler, site: Site, shared: CallShared, report: Callable[[SiteOutcome], None]) -> None:
        self.site = site
        self.original = site.module.processor
        self.processor = JointInhibitorProcessor(self.original, site, shared, report, text_first=handler.text_first)
        site.module.set_processor(self.processor)

    def state(self) -> SiteState:
        return "ours" if self.site.module.processor is self.processor else "broken"

    def processor_name(self) -> str:
        return processor_name(self.site.module.processor)

    def remove(self) -> None:
        if self.site.module.processor is self.processor:
            self.site.module.set_processor(self.original)


def _attention_backend(processor: Any) -> Any:
    """The backend a processor that dispatches through diffusers runs (None: the active one)."""
    return getattr(processor, "_attention_backend", None)


class JointInhibitorProcessor:
    """The processor of one joint-attention site inside a call."""

    def __init__(self, original: Any, site: Site, shared: CallShared, report: Callable[[SiteOutcome], None], *,
                 text_first: bool) -> None:
        self.original = original
        self.site = site
        self.shared = shared
        self.report = report
        self.text_first = text_first
        self.backend = _attention_backend(original)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        ctx = self.shared.context()
        if ctx is None or ctx.ride is None:
            args = (attn, hidden_states, encoder_hidden_states, attention_mask)
            if image_rotary_emb is not None:
                return self.original(*args, image_rotary_emb, **kwargs)
            return self.original(*args, **kwargs)
        if attention_mask is not None:
            self.shared.fail(f"{self.site.name}: an attention mask in a joint-attention block is not supported")
        started = time.perf_counter()
        out, result, nonzero = self._guarded(attn, hidden_states, encoder_hidden_states, image_rotary_emb, ctx.ride, ctx)
        self.report(SiteOutcome(self.site, inhibited=result.delta is not None, nonzero=nonzero,
                                measured=result.measured, maps=result.maps, seconds=time.perf_counter() - started))
        return out

    def _dispatch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The prompt's attention ``(B, h, S, d)`` through diffusers' dispatcher and this
        block's backend, as the block's own processor runs it."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out: torch.Tensor = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  backend=self.backend)
        return out.transpose(1, 2)

    # -- the guarded block ---------------------------------------------------------------------
    def _guarded(self, attn: Any, hidden: torch.Tensor, text: torch.Tensor | None, rotary: Any, ride: RideAlong,
                 ctx: StepContext) -> tuple[Any, inhibition.SiteResult, torch.Tensor | None]:
        single = text is None  # Flux single-stream: hidden is [text; image] already
        t_all = ride.text_length + ride.concept_length  # prompt text + concept tokens
        if text is None:
            q, k, v = project_heads(attn, hidden, added=False)
        else:
            qi, ki, vi = project_heads(attn, hidden, added=False)
            qt, kt, vt = project_heads(attn, text, added=True)

            def cat(text_part: torch.Tensor, image_part: torch.Tensor) -> torch.Tensor:
                return torch.cat([text_part, image_part] if self.text_first else [image_part, text_part], dim=2)

            q, k, v = cat(qt, qi), cat(kt, ki), cat(vt, vi)
        if rotary is not None:
            q, k = _rope(q, rotary), _rope(k, rotary)
        # token ranges in the sequence (B, h, S, d)
        n_total = q.shape[2]
        if self.text_first or single:
            txt, con, img = slice(0, ride.text_length), slice(ride.text_length, t_all), slice(t_all, n_total)
        else:
            img = slice(0, n_total - t_all)
            txt = slice(n_total - t_all, n_total - ride.concept_length)
            con = slice(n_total - ride.concept_length, n_total)
        scale = 1.0 / math.sqrt(q.shape[-1])

        # 1. the prompt's own joint attention, in the block's order, without the concept tokens
        keep = [txt, img] if (self.text_first or single) else [img, txt]
        q_p, k_p, v_p = (torch.cat([t[:, :, s] for s in keep], dim=2) for t in (q, k, v))
        o_p = self._dispatch(q_p, k_p, v_p)
        n_img = img.stop - img.start
        img_q = slice(0, n_img) if keep[0] is img else slice(q_p.shape[2] - n_img, q_p.shape[2])
        txt_q = slice(n_img, q_p.shape[2]) if keep[0] is img else slice(0, q_p.shape[2] - n_img)

        # 2. the concept tokens of the rows that carry the prompt, over [image; own tokens]
        rows = ctx.rows
        o_con = q.new_zeros(q.shape[0], q.shape[1], ride.concept_length, q.shape[3])
        k_img_r, v_img_r = k[rows, :, img], v[rows, :, img]
        carried = []
        for lo, hi in ride.spans:
            span = slice(con.start + lo, con.start + hi)
            kc, vc = k[rows, :, span], v[rows, :, span]
            o_con[rows, :, lo:hi] = attention.attend(
                q[rows, :, span], torch.cat([k_img_r, kc], dim=2), torch.cat([v_img_r, vc], dim=2), scale=scale
            )
            carried.append((kc, vc))

        # 3. measure / observe / inhibit on the image queries of those rows
        plan = self.shared.plan
        q_img = q_p[rows, :, img_q]
        sink_keys = k_img_r if self.shared.sink == "image" else k_p[rows]
        sink = attention.masked_lse(q_img, sink_keys, None, scale=scale)
        slots = [list(s) for s in plan.ride_along]
        per_concept, per_anchor = carried[: len(slots)], carried[len(slots):]
        own = [[i for i, slot in enumerate(c) if slot in set(p)] for c, p in zip(plan.anchor_ride_along, plan.anchor_positions)]
        competing, spared = inhibition.anchor_effects(
            plan, [vc for _, vc in per_concept], [ka[:, :, cols] for (ka, _), cols in zip(per_anchor, own)],
            [va[:, :, cols] for (_, va), cols in zip(per_anchor, own)])
        concepts = inhibition.ConceptKeys(keys=[kc for kc, _ in per_concept], values=spared, slots=slots,
                                          competing=competing)
        try:
            result = inhibition.act(q_img, concepts, ctx, plan, scale=scale, sink_lse=sink)
        except ValueError as error:
            self.shared.fail(f"{self.site.name}: {error}")
        o_img_p = o_p[:, :, img_q]
        nonzero = None
        if result.delta is not None:
            o_img_p = o_img_p.clone()
            delta = result.delta.to(o_img_p.dtype)
            o_img_p[rows] -= delta
            nonzero = delta.ne(0).any()

        # back to the block's layout: (B, S, h * d)
        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).flatten(2, 3).to(hidden.dtype)

        image_out, text_out = flat(o_img_p), flat(torch.cat([o_p[:, :, txt_q], o_con], dim=2))
        if single:
            return torch.cat([text_out, image_out], dim=1), result, nonzero
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        if not getattr(attn, "context_pre_only", False):
            text_out = attn.to_add_out(text_out)
        return (image_out, text_out), result, nonzero
