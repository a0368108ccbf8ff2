"""Flux (dev, schnell, Kontext, Fill): double-stream blocks over ``[text; image]`` with
rotary positions, then single-stream blocks over the concatenated sequence.

The text sequence is T5's (``max_sequence_length`` slots, 512 by default); CLIP only gives
the pooled vector that conditions every block's modulation, which attention cannot reach:
a concept carried by the pooled vector alone is not inhibited (docs/families.md). A concept's
own tokens are the non-special T5 ids; they and the end token ride along with text position
ids of zero, as the pipeline gives its prompt. There is no classifier-free-guidance batch:
every row carries the prompt; with ``true_cfg_scale > 1`` the pipeline makes a second
denoiser call with the negative prompt, which is left alone.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import UnsupportedPipelineError
from .base import JointFamily, Site, call_default, concept_slots, ride_along_slots

__all__ = ["Flux", "double_and_single_sites", "t5_length_option"]


def double_and_single_sites(model: Any) -> tuple[Site, ...]:
    """A Flux-layout transformer's sites: its double-stream blocks' joint attention, then its
    single-stream blocks' (numbered on after the double ones)."""
    double = [
        Site(name=f"transformer_blocks.{i}.attn", module=b.attn, kind="joint", block=i)
        for i, b in enumerate(getattr(model, "transformer_blocks", ()))
    ]
    single = [
        Site(name=f"single_transformer_blocks.{i}.attn", module=b.attn, kind="single", block=len(double) + i)
        for i, b in enumerate(getattr(model, "single_transformer_blocks", ()))
    ]
    return tuple(double + single)


def t5_length_option(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The T5 sequence length a call encodes its prompt with (the pipeline's default: 512)."""
    length = kwargs.get("max_sequence_length") or call_default(pipe, "max_sequence_length", 512)
    return {"max_sequence_length": int(length)}


class Flux(JointFamily):
    name = "flux"
    pipelines = (
        "FluxPipeline",
        "FluxImg2ImgPipeline",
        "FluxInpaintPipeline",
        "FluxKontextPipeline",
        "FluxFillPipeline",
    )
    refused = {
        "FluxControlNetPipeline": "the Flux ControlNet's own blocks see the prompt unguarded",
        "FluxControlNetImg2ImgPipeline": "the Flux ControlNet's own blocks see the prompt unguarded",
        "FluxControlNetInpaintPipeline": "the Flux ControlNet's own blocks see the prompt unguarded",
        "FluxPriorReduxPipeline": "Redux conditions on image embeddings gie_guard cannot inhibit",
    }
    text_first = True
    default_sink = "image"
    fused_projections = False  # joint attention is re-implemented around unfused to_q/to_k/to_v
    shared_kwargs = frozenset({"txt_ids", "img_ids"})  # positions, not per batch row
    tokenizer_attrs = ("tokenizer", "tokenizer_2")
    text_encoder_attrs = ("text_encoder", "text_encoder_2")

    @classmethod
    def processors(cls) -> set[type]:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        return {FluxAttnProcessor}

    def sites(self, pipe: Any) -> tuple[Site, ...]:
        return double_and_single_sites(self.denoiser(pipe))

    def encoding_options(self, pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        return t5_length_option(pipe, kwargs)

    def _slots(self, pipe: Any, text: str, concept_id: str, options: dict[str, Any]) -> tuple[list[int], list[int]]:
        tokenizer = pipe.tokenizer_2
        ids, own = concept_slots(tokenizer, text, concept_id, max_length=options["max_sequence_length"])
        return own, ride_along_slots(ids, own, tokenizer.eos_token_id)

    def _encode_prompt(self, pipe: Any, texts: list[str], options: dict[str, Any]) -> torch.Tensor:
        embeds: torch.Tensor = pipe.encode_prompt(
            prompt=texts, prompt_2=None, device=pipe._execution_device, num_images_per_prompt=1,
            max_sequence_length=options["max_sequence_length"],
        )[0]
        return embeds

    def prompt_embeddings(self, result: Any, call_index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # (embeds, pooled, text ids); with true CFG the pipeline encodes the negative prompt second
        return (result[0], None) if call_index == 0 else (None, result[0])

    def ride_along(self, args: tuple[Any, ...], kwargs: dict[str, Any], tokens: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, new = super().ride_along(args, kwargs, tokens)
        ids = kwargs.get("txt_ids")
        if ids is not None:
            ids2 = ids[0] if ids.ndim == 3 else ids
            new["txt_ids"] = torch.cat([ids2, ids2.new_zeros(tokens.shape[0], ids2.shape[-1])], dim=0)
        return args, new
