"""Chroma (``ChromaPipeline``, ``ChromaImg2ImgPipeline``): Flux's transformer layout and
attention (``FluxAttention``, ``FluxAttnProcessor``: double-stream blocks over ``[text; image]``
with rotary positions, then single-stream blocks), T5 text only, and an attention mask.

- **Text**: T5 only (``max_sequence_length`` slots, 512 by default), encoded with the padding
  mask. There is no CLIP and no pooled vector: modulation comes from the timestep alone
  (Chroma's approximator), so everything the prompt says reaches the image through attention.
- **The mask**: the pipeline marks the prompt's own tokens, its end token and *one* pad as
  real (``mask_indices <= seq_lengths``), appends ones for the image tokens and passes the
  ``(B, T + N)`` mask to the transformer; every block turns it into ``m[:, None, None, :] *
  m[:, None, :, None]`` (``(B, 1, S, S)``) for its attention. diffusers 0.42 builds it as a
  *float* 0/1 tensor, which scaled-dot-product attention adds to the logits (diffusers issue
  12116): real pairs get +1, pads +0, nothing is removed. The guard keeps whatever the
  pipeline passes, bool or float, exactly as SDPA reads it (:class:`MaskedJointProcessor`).
- **Concepts**: encoded by the pipeline's own ``encode_prompt`` as if each were the prompt.
  Its own tokens are the non-special T5 ids; they, the end token and the one pad the mask
  leaves visible ride along (the slots Chroma's mask makes real for a prompt), with text
  position ids of zero as the prompt has, and with mask ones, inserted after the prompt's
  text and before the image tokens.
- **Classifier-free guidance** (``guidance_scale > 1``, the default) is a second denoiser call
  with the negative prompt's embeddings, ids and mask; that call is left alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .. import attention, inhibition
from ..joint import JointHandler, JointInhibitorProcessor, JointSite, project_heads
from ..sites import Site, SiteHandler, SiteKind, SiteOutcome
from .base import JointFamily, call_default, concept_slots, ride_along_slots
from .flux import Flux

if TYPE_CHECKING:
    from ..context import CallShared, RideAlong, StepContext

__all__ = ["Chroma", "MaskedJointHandler", "MaskedJointProcessor", "chroma_ride_along_slots"]


def chroma_ride_along_slots(ids: list[int], own: list[int], end_id: int | None, pad_id: int | None) -> list[int]:
    """The concept's own slots, its end token and the one pad after it: the slots Chroma's
    mask leaves visible when the concept is the prompt."""
    slots = ride_along_slots(ids, own, end_id)
    after = slots[-1] + 1
    if len(slots) > len(own) and pad_id is not None and after < len(ids) and ids[after] == pad_id:
        slots.append(after)
    return slots


# ---------------------------------------------------------------------------------------------
# The joint site under a mask


def _four_d(mask: torch.Tensor) -> torch.Tensor:
    """A mask as SDPA broadcasts it: ``(B, S)``, ``(B, Q, S)`` or ``(B, 1 | h, 1 | Q, S)`` ->
    ``(B, 1 | h, 1 | Q, S)``."""
    if mask.ndim == 2:
        return mask[:, None, None, :]
    if mask.ndim == 3:
        return mask[:, None]
    return mask


def _part(mask: torch.Tensor, rows: Any, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The block of a 4-d mask for batch ``rows``, query positions and key positions."""
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


class MaskedJointProcessor(JointInhibitorProcessor):
    """The joint processor of a block that receives an attention mask over its joint sequence
    (Chroma). The family extended the mask with ones for the carried tokens, so it covers
    ``[prompt text; carried tokens; image]``; every part is taken from it as the block's own
    processor takes it (SDPA's reading: bool keeps/removes, float is added):

    - the prompt's attention (image and prompt-text queries over image and prompt-text keys)
      runs through the block's attention backend with the block's mask restricted to those
      tokens: the pipeline's padding treatment exactly, and the carried tokens invisible to it;
    - each concept's carried tokens attend over ``[image; their own]`` under the mask's entries
      for those pairs (unmasked: they are real tokens);
    - the sink's normaliser is taken under the mask (a masked key never counts), and the
      concept's columns carry the mask's entry for (image query, carried key), which must be
      one value per query over all carried tokens (it is: they are all real); it moves into the
      sink, so the engine's inhibitor runs unchanged.
    """

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
        if attention_mask is None or ctx is None or ctx.ride is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                    **kwargs)
        started = time.perf_counter()
        out, result, nonzero = self._masked(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                                            _four_d(attention_mask), ctx.ride, ctx)
        self.report(SiteOutcome(self.site, inhibited=result.delta is not None, nonzero=nonzero,
                                measured=result.measured, maps=result.maps, seconds=time.perf_counter() - started))
        return out

    def _dispatch_masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The prompt's attention ``(B, h, S, d)`` through diffusers' dispatcher and this block's
        backend, with its mask, as the block's own processor runs it."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out: torch.Tensor = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=mask, backend=self.backend)
        return out.transpose(1, 2)

    def _masked(self, attn: Any, hidden: torch.Tensor, text: torch.Tensor | None, rotary: Any, mask: torch.Tensor,
                ride: RideAlong, ctx: StepContext) -> tuple[Any, inhibition.SiteResult, torch.Tensor | None]:
        single = text is None  # single-stream: hidden is [prompt text; carried; image] already
        t_all = ride.text_length + ride.concept_length
        if text is None:
            q, k, v = project_heads(attn, hidden, added=False)
        else:
            qi, ki, vi = project_heads(attn, hidden, added=False)
            qt, kt, vt = project_heads(attn, text, added=True)
            q, k, v = (torch.cat(pair, dim=2) for pair in ((qt, qi), (kt, ki), (vt, vi)))  # [text; image]
        if rotary is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q, k = (apply_rotary_emb(x, rotary, sequence_dim=2) for x in (q, k))
        n_total = q.shape[2]
        if mask.shape[-1] != n_total or mask.shape[-2] not in (1, n_total) or mask.shape[1] != 1:
            self.shared.fail(f"{self.site.name}: its attention mask {tuple(mask.shape)} is not one (B, 1, 1 | S, S) "
                             f"mask over the joint sequence with the concepts riding along (S = {n_total})")
        device = q.device
        txt = torch.arange(0, ride.text_length, device=device)
        img = torch.arange(t_all, n_total, device=device)
        prompt = torch.cat([txt, img])  # [text; image], the block's order without the carried tokens
        n_img, n_txt = img.numel(), txt.numel()
        scale = 1.0 / math.sqrt(q.shape[-1])
        every = slice(None)

        # 1. the prompt's own joint attention under the block's mask, without the carried tokens
        q_p, k_p, v_p = (t.index_select(2, prompt) for t in (q, k, v))
        o_p = self._dispatch_masked(q_p, k_p, v_p, _part(mask, every, prompt, prompt))
        img_q = slice(n_txt, n_txt + n_img)

        # 2. the carried tokens of the rows that carry the prompt, over [image; their own]
        rows = ctx.rows
        o_con = q.new_zeros(q.shape[0], q.shape[1], ride.concept_length, q.shape[3])
        k_img_r, v_img_r = k[rows][:, :, img], v[rows][:, :, img]
        carried = []
        for lo, hi in ride.spans:
            span = torch.arange(t_all - ride.concept_length + lo, t_all - ride.concept_length + hi, device=device)
            kc, vc = k[rows][:, :, span], v[rows][:, :, span]
            o_con[rows, :, lo:hi] = attention.attend(
                q[rows][:, :, span], torch.cat([k_img_r, kc], dim=2), torch.cat([v_img_r, vc], dim=2), scale=scale,
                mask=_part(mask, rows, span, torch.cat([img, span])),
            )
            carried.append((kc, vc))

        # 3. measure / observe / inhibit on the image queries of those rows
        plan = self.shared.plan
        q_img = q_p[rows][:, :, img_q]
        if self.shared.sink == "image":
            sink_keys, sink_cols = k_img_r, img
        else:
            sink_keys, sink_cols = k_p[rows], prompt
        sink_mask = _part(mask, rows, img, sink_cols)[:, 0]  # (B_rows, 1 | N, T_sink)
        sink = attention.masked_lse(q_img, sink_keys, sink_mask, scale=scale)
        carried_cols = torch.arange(ride.text_length, t_all, device=device)
        bias = _as_bias(_part(mask, rows, img, carried_cols))  # (B_rows, 1, 1 | N, T_carried)
        if ride.concept_length and not bool((bias == bias[..., :1]).all()):
            self.shared.fail(f"{self.site.name}: its attention mask treats a concept's carried tokens unlike each "
                             "other for an image query")
        if ride.concept_length:
            # exp(s_c + b) / (Z_sink + sum exp(s_k + b)) = exp(s_c) / (Z_sink e^-b + sum exp(s_k))
            sink = sink - bias[..., 0]  # (B_rows, 1, 1 | N) against (B_rows, h, N)
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

        image_out, text_out = flat(o_img_p), flat(torch.cat([o_p[:, :, :n_txt], o_con], dim=2))
        if single:
            return torch.cat([text_out, image_out], dim=1), result, nonzero
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        if not getattr(attn, "context_pre_only", False):
            text_out = attn.to_add_out(text_out)
        return (image_out, text_out), result, nonzero


class MaskedJointSite(JointSite):
    """One Chroma block's processor, replaced by :class:`MaskedJointProcessor` for one call."""

    def __init__(self, handler: JointHandler, site: Site, shared: CallShared, report: Callable[[SiteOutcome], None]) -> None:
        self.site = site
        self.original = site.module.processor
        self.processor = MaskedJointProcessor(self.original, site, shared, report, text_first=True)
        site.module.set_processor(self.processor)


class MaskedJointHandler(JointHandler):
    """Guards joint blocks ordered ``[text; image]`` that receive an attention mask (Chroma)."""

    def install(self, site: Site, shared: CallShared, report: Callable[[SiteOutcome], None]) -> JointSite:
        return MaskedJointSite(self, site, shared, report)


# ---------------------------------------------------------------------------------------------
# The family


class Chroma(JointFamily):
    """Flux's block layout and processor, T5 only, with a mask. A sibling of :class:`~.flux.Flux`
    rather than a subclass: none of Flux's pipeline lists, refusals, tokenizers or encoding
    calls apply."""

    name = "chroma"
    pipelines = ("ChromaPipeline", "ChromaImg2ImgPipeline")
    text_first = True
    default_sink = "image"
    fused_projections = False  # joint attention is re-implemented around unfused to_q/to_k/to_v
    shared_kwargs = frozenset({"txt_ids", "img_ids"})  # positions; the attention mask is per row

    @classmethod
    def processors(cls) -> set[type]:
        return Flux.processors()  # Chroma's blocks run FluxAttention with FluxAttnProcessor

    def site_handlers(self) -> dict[SiteKind, SiteHandler]:
        handler = MaskedJointHandler(self.processors, text_first=True)
        return {"joint": handler, "single": handler}

    def sites(self, pipe: Any) -> tuple[Site, ...]:
        model = self.denoiser(pipe)
        double = [
            Site(name=f"transformer_blocks.{i}.attn", module=b.attn, kind="joint", block=i)
            for i, b in enumerate(getattr(model, "transformer_blocks", ()))
        ]
        single = [
            Site(name=f"single_transformer_blocks.{i}.attn", module=b.attn, kind="single", block=len(double) + i)
            for i, b in enumerate(getattr(model, "single_transformer_blocks", ()))
        ]
        return tuple(double + single)

    def encoding_options(self, pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        length = kwargs.get("max_sequence_length") or call_default(pipe, "max_sequence_length", 512)
        return {"max_sequence_length": int(length)}

    def _slots(self, pipe: Any, text: str, concept_id: str, options: dict[str, Any]) -> tuple[list[int], list[int]]:
        tokenizer = pipe.tokenizer
        convert = getattr(pipe, "maybe_convert_prompt", None)  # textual-inversion tokens expand as in a prompt
        ids, own = concept_slots(tokenizer, text, concept_id, max_length=options["max_sequence_length"], convert=convert)
        return own, chroma_ride_along_slots(ids, own, tokenizer.eos_token_id, tokenizer.pad_token_id)

    def _encode_prompt(self, pipe: Any, texts: list[str], options: dict[str, Any]) -> torch.Tensor:
        # (embeds, text ids, mask, negative embeds, negative text ids, negative mask)
        embeds: torch.Tensor = pipe.encode_prompt(
            prompt=texts, device=pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=options["max_sequence_length"],
        )[0]
        return embeds

    def prompt_embeddings(self, result: Any, call_index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # one encode_prompt call per generation returns both; the denoiser is called once per branch
        return result[0], result[3]

    def ride_along(self, args: tuple[Any, ...], kwargs: dict[str, Any], tokens: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The carried tokens appended to the text states, with text position ids of zero (as the
        prompt's) and mask ones inserted between the prompt's text and the image."""
        text_length = int(kwargs["encoder_hidden_states"].shape[1])
        args, new = super().ride_along(args, kwargs, tokens)  # the text states
        ids = kwargs.get("txt_ids")
        if ids is not None:
            ids2 = ids[0] if ids.ndim == 3 else ids
            new["txt_ids"] = torch.cat([ids2, ids2.new_zeros(tokens.shape[0], ids2.shape[-1])], dim=0)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            ones = mask.new_ones(mask.shape[0], tokens.shape[0])
            new["attention_mask"] = torch.cat([mask[:, :text_length], ones, mask[:, text_length:]], dim=1)
        return args, new
