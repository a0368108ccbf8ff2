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
from .concept_stack import own_columns, stack_concepts
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


def _four_d(mask: torch.Tensor) -> torch.Tensor:
    """A mask as SDPA broadcasts it: ``(B, S)``, ``(B, Q, S)`` or ``(B, 1 | h, 1 | Q, S)`` ->
    ``(B, 1 | h, 1 | Q, S)``."""
    if mask.ndim == 2:
        return mask[:, None, None, :]
    if mask.ndim == 3:
        return mask[:, None]
    return mask


def _part(mask: torch.Tensor | None, rows: Any, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """The block of a 4-d mask for batch ``rows``, query positions and key positions."""
    if mask is None:
        return None
    part = mask[rows]
    if part.shape[-2] != 1:
        part = part.index_select(-2, queries.to(part.device))
    return part.index_select(-1, keys.to(part.device))


def _as_bias(mask: torch.Tensor) -> torch.Tensor:
    """What SDPA adds to the logits for ``mask``: float32, 0 / -inf for a boolean mask (True
    keeps), the values themselves for a float one."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def _carried_mask(model: torch.Tensor | None, ride: RideAlong, n_img: int, device: torch.device) -> torch.Tensor:
    """What the carried tokens' queries may see among ``[image; every carried token]``: every
    image token and the tokens of their own text (``(T_all, N + T_all)``, True sees), under the
    block's own mask where it has one (``model``: its part for those queries and keys)."""
    span = torch.repeat_interleave(torch.arange(len(ride.spans)),
                                   torch.tensor([hi - lo for lo, hi in ride.spans]))  # (T_all,)
    own = span[:, None] == span[None, :]
    block = torch.cat([torch.ones(len(span), n_img, dtype=torch.bool), own], dim=1)
    block = block.to(device)
    if model is None:
        return block
    if model.dtype == torch.bool:
        return model & block
    return model.masked_fill(~block, float("-inf"))


class JointHandler:
    """Guards joint-attention blocks whose processor's class is in ``processors()`` (the
    family's: diffusers' SD3 or Flux processor), in the sequence order the family uses.
    ``masks``: the family's blocks receive an attention mask over the joint sequence (Chroma),
    which the family extends over the carried tokens; without it a mask fails the call."""

    def __init__(self, processors: Callable[[], set[type]], *, text_first: bool, masks: bool = False) -> None:
        self._processors = processors
        self._classes: set[type] | None = None
        self.text_first = text_first  # [text; image] (Flux) or [image; text] (SD3)
        self.masks = masks

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
        self.processor = JointInhibitorProcessor(self.original, site, shared, report, text_first=handler.text_first,
                                                 masks=handler.masks)
        site.module.set_processor(self.processor)

    def state(self) -> SiteState:
        return "ours" if self.site.module.processor is self.processor else "broken"

    def processor_name(self) -> str:
        return processor_name(self.site.module.processor)

    def remove(self) -> None:
        if self.site.module.processor is self.processor:
            self.site.module.set_processor(self.original)


def _own(carried: Any, positions: Any) -> list[int]:
    """The columns of a text's own tokens among its carried slots."""
    mine = set(positions)
    return [i for i, slot in enumerate(carried) if slot in mine]


def _attention_backend(processor: Any) -> Any:
    """The backend a processor that dispatches through diffusers runs (None: the active one)."""
    return getattr(processor, "_attention_backend", None)


class JointInhibitorProcessor:
    """The processor of one joint-attention site inside a call.

    With a mask (``masks``, Chroma) every part is taken from the block's mask as the block's
    own processor takes it (SDPA's reading: a boolean keeps or removes, a float is added): the
    prompt's attention under the mask restricted to the prompt's tokens; each concept's carried
    tokens over ``[image; their own]`` under the mask's entries for those pairs; the sink's
    normaliser under the mask (a masked key never counts). The concept's columns carry the
    mask's entry for (image query, carried key), which must be one value per query over all
    carried tokens (the family marks them all real); it moves into the sink, so the inhibitor's
    maths runs unchanged: ``exp(s_c + b) / (Z + sum exp(s_k + b)) = exp(s_c) / (Z e^-b + sum exp(s_k))``.
    """

    def __init__(self, original: Any, site: Site, shared: CallShared, report: Callable[[SiteOutcome], None], *,
                 text_first: bool, masks: bool = False) -> None:
        self.original = original
        self.site = site
        self.shared = shared
        self.report = report
        self.text_first = text_first
        self.masks = masks
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
        if attention_mask is not None and not self.masks:
            self.shared.fail(f"{self.site.name}: an attention mask in a joint-attention block is not supported")
        started = time.perf_counter()
        mask = None if attention_mask is None else _four_d(attention_mask)
        out, result, nonzero = self._guarded(attn, hidden_states, encoder_hidden_states, image_rotary_emb, mask,
                                             ctx.ride, ctx)
        self.report(SiteOutcome(self.site, inhibited=result.delta is not None, nonzero=nonzero,
                                measured=result.measured, maps=result.maps, seconds=time.perf_counter() - started))
        return out

    def _dispatch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The prompt's attention ``(B, h, S, d)`` through diffusers' dispatcher and this
        block's backend, as the block's own processor runs it."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out: torch.Tensor = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=mask, backend=self.backend)
        return out.transpose(1, 2)

    @staticmethod
    def _output_gates(o_image: torch.Tensor, v_carried: torch.Tensor, ride: RideAlong, plan: Any) -> list[torch.Tensor]:
        """Output-space saliency: per concept ``(B_rows, N)``, True where the image token's
        attention output is nearer (dot product over heads and features) the mean value of the
        concept's own tokens at this block (what an image token that read only the concept would
        output) than the mean value of every reference's. The concept tokens' own attention
        outputs (ConceptAttention's choice) were measured first: gated by them, the shapes
        transformer erased at most 0.46 of circles at any scale (docs/precision.md).
        ``o_image`` ``(B_rows, h, N, d)``; ``v_carried`` ``(B_rows, h, T_all, d)``."""
        def mean_own(span: tuple[int, int], cols: list[int]) -> torch.Tensor:
            return v_carried[:, :, span[0]:span[1]][:, :, cols].mean(dim=2)  # (B_rows, h, d)

        n_c, n_a = len(plan.ride_along), len(plan.anchor_ride_along)
        spans = ride.spans
        concept_out = [mean_own(spans[c], _own(plan.ride_along[c], plan.token_positions[c])) for c in range(n_c)]
        reference_out = [mean_own(spans[n_c + n_a + r], _own(s, p))
                         for r, (s, p) in enumerate(zip(plan.reference_ride_along, plan.reference_positions))]

        def score(o: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bhnd,bhd->bn", o_image.float(), o.float())

        best_reference = torch.stack([score(o) for o in reference_out]).amax(dim=0)
        return [score(o) > best_reference for o in concept_out]

    # -- the guarded block ---------------------------------------------------------------------
    def _guarded(self, attn: Any, hidden: torch.Tensor, text: torch.Tensor | None, rotary: Any,
                 mask: torch.Tensor | None, ride: RideAlong,
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
        # token positions in the sequence (B, h, S, d): [text; carried; image] or [image; text; carried]
        n_total, device = q.shape[2], q.device
        if mask is not None and (mask.shape[-1] != n_total or mask.shape[-2] not in (1, n_total) or mask.shape[1] != 1):
            self.shared.fail(f"{self.site.name}: its attention mask {tuple(mask.shape)} is not one (B, 1, 1 | S, S) "
                             f"mask over the joint sequence with the concepts riding along (S = {n_total})")
        text_first = self.text_first or single
        first = 0 if text_first else n_total - t_all  # where the prompt's text starts
        txt = torch.arange(first, first + ride.text_length, device=device)
        carried_at = first + ride.text_length
        img = torch.arange(t_all if text_first else 0, (t_all if text_first else 0) + n_total - t_all, device=device)
        prompt = torch.cat([txt, img] if text_first else [img, txt])  # the block's order, without the carried tokens
        n_img, n_txt = img.numel(), txt.numel()
        img_q = slice(n_txt, n_txt + n_img) if text_first else slice(0, n_img)  # within the prompt's order
        txt_q = slice(0, n_txt) if text_first else slice(n_img, n_img + n_txt)
        scale = 1.0 / math.sqrt(q.shape[-1])
        every = slice(None)

        # 1. the prompt's own joint attention, in the block's order, without the concept tokens
        q_p, k_p, v_p = (t.index_select(2, prompt) for t in (q, k, v))
        o_p = self._dispatch(q_p, k_p, v_p, _part(mask, every, prompt, prompt))

        # 2. the carried tokens of the rows that carry the prompt, each over [image; its own text's
        # tokens]: one attention over [image; every carried token] with a block mask
        rows = ctx.rows
        o_con = q.new_zeros(q.shape[0], q.shape[1], ride.concept_length, q.shape[3])
        k_img_r, v_img_r = k[rows].index_select(2, img), v[rows].index_select(2, img)
        carried_all = torch.arange(carried_at, carried_at + ride.concept_length, device=device)
        kc_all, vc_all = k[rows].index_select(2, carried_all), v[rows].index_select(2, carried_all)
        if ride.concept_length:
            o_con[rows] = attention.attend(
                q[rows].index_select(2, carried_all), torch.cat([k_img_r, kc_all], dim=2),
                torch.cat([v_img_r, vc_all], dim=2), scale=scale,
                mask=_carried_mask(_part(mask, rows, carried_all, torch.cat([img, carried_all])), ride, n_img,
                                   device),
            )
        carried = [(kc_all[:, :, lo:hi], vc_all[:, :, lo:hi]) for lo, hi in ride.spans]

        # 3. measure / observe / inhibit on the image queries of those rows
        plan = self.shared.plan
        q_img = q_p[rows][:, :, img_q]
        sink_keys, sink_cols = (k_img_r, img) if self.shared.sink == "image" else (k_p[rows], prompt)
        sink_mask = _part(mask, rows, img, sink_cols)
        sink = attention.masked_lse(q_img, sink_keys, None if sink_mask is None else sink_mask[:, 0], scale=scale)
        if mask is not None and ride.concept_length:
            bias = _as_bias(_part(mask, rows, img, torch.arange(carried_at, carried_at + ride.concept_length,
                                                                 device=device)))  # type: ignore[arg-type]
            if not bool((bias == bias[..., :1]).all()):
                self.shared.fail(f"{self.site.name}: its attention mask treats a concept's carried tokens unlike each "
                                 "other for an image query")
            sink = sink - bias[..., 0]  # (B_rows, 1, 1 | N) against (B_rows, h, N)
        slots = [list(s) for s in plan.ride_along]
        n_c, n_a = len(slots), len(plan.anchor_ride_along)
        per_concept, per_anchor, per_reference = carried[:n_c], carried[n_c:n_c + n_a], carried[n_c + n_a:]
        own = [_own(c, p) for c, p in zip(plan.anchor_ride_along, plan.anchor_positions)]
        own_c = own_columns(plan, slots)
        competing, spared = inhibition.anchor_effects(
            plan, [vc[:, :, cols] for (_, vc), cols in zip(per_concept, own_c)],
            [ka[:, :, cols] for (ka, _), cols in zip(per_anchor, own)],
            [va[:, :, cols] for (_, va), cols in zip(per_anchor, own)])
        concepts = stack_concepts(plan, [kc for kc, _ in per_concept], spared, slots, competing)
        references = gates = None
        if per_reference:
            own_r = [_own(c, p) for c, p in zip(plan.reference_ride_along, plan.reference_positions)]
            references = inhibition.ReferenceKeys(keys=[kr for kr, _ in per_reference], own=own_r)
            if plan.concept_map == "output":
                gates = self._output_gates(o_p[rows][:, :, img_q], vc_all, ride, plan)
        try:
            result = inhibition.act(q_img, concepts, ctx, plan, scale=scale, sink_lse=sink, references=references,
                                    gates=gates)
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
