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
  pipeline passes, bool or float, exactly as SDPA reads it (the joint handler with
  ``masks=True``, engine/joint.py).
- **Concepts**: encoded by the pipeline's own ``encode_prompt`` as if each were the prompt.
  Its own tokens are the non-special T5 ids; they, the end token and the one pad the mask
  leaves visible ride along (the slots Chroma's mask makes real for a prompt), with text
  position ids of zero as the prompt has, and with mask ones, inserted after the prompt's
  text and before the image tokens.
- **Classifier-free guidance** (``guidance_scale > 1``, the default) is a second denoiser call
  with the negative prompt's embeddings, ids and mask; that call is left alone.
"""

from __future__ import annotations

from typing import Any

import torch

from ..joint import JointHandler
from ..sites import Site, SiteHandler, SiteKind
from .base import JointFamily, concept_slots, ride_along_slots
from .flux import Flux, double_and_single_sites, t5_length_option

__all__ = ["Chroma", "chroma_ride_along_slots"]


def chroma_ride_along_slots(ids: list[int], own: list[int], end_id: int | None, pad_id: int | None) -> list[int]:
    """The concept's own slots, its end token and the one pad after it: the slots Chroma's
    mask leaves visible when the concept is the prompt."""
    slots = ride_along_slots(ids, own, end_id)
    after = slots[-1] + 1
    if len(slots) > len(own) and pad_id is not None and after < len(ids) and ids[after] == pad_id:
        slots.append(after)
    return slots


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
        handler = JointHandler(self.processors, text_first=True, masks=True)  # the blocks receive the mask
        return {"joint": handler, "single": handler}

    def sites(self, pipe: Any) -> tuple[Site, ...]:
        return double_and_single_sites(self.denoiser(pipe))

    def encoding_options(self, pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        return t5_length_option(pipe, kwargs)

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
