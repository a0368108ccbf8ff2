"""Stable Diffusion 3 / 3.5: MM-DiT joint attention over ``[image; text]``.

The text sequence the transformer receives is the CLIP part (CLIP-L and CLIP-G states
concatenated along features, padded to the joint width; ``tokenizer_max_length`` slots)
followed by the T5 part (``max_sequence_length`` slots, zeros without a T5 encoder). A
concept's own tokens are the non-special ids of the CLIP tokenizers in the first part and of
the T5 tokenizer in the second; those and each part's end token ride along through the
blocks (engine/joint.py). Classifier-free guidance stacks ``[negative; prompt]``; skip-layer
guidance adds a denoiser call on the prompt rows that skips some blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import JointFamily, Site, call_default, concept_slots, ride_along_slots

__all__ = ["StableDiffusion3"]


class StableDiffusion3(JointFamily):
    name = "sd3"
    pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
    refused = {
        "StableDiffusion3ControlNetPipeline": "the SD3 ControlNet's own joint blocks see the prompt unguarded",
        "StableDiffusion3PAGPipeline": "PAG's joint-attention processors are not reproduced yet",
    }
    text_first = False
    default_sink = "image"
    tokenizer_attrs = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_encoder_attrs = ("text_encoder", "text_encoder_2", "text_encoder_3")

    @classmethod
    def processors(cls) -> set[type]:
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        return {JointAttnProcessor2_0}

    def sites(self, pipe: Any) -> tuple[Site, ...]:
        model = self.denoiser(pipe)
        return tuple(
            Site(name=f"transformer_blocks.{i}.attn", module=block.attn, kind="joint", block=i)
            for i, block in enumerate(getattr(model, "transformer_blocks", ()))
        )

    def expected_sites(self, sites: Sequence[Site], kwargs: dict[str, Any]) -> Sequence[Site]:
        skipped = set(kwargs.get("skip_layers") or ())
        return [s for s in sites if s.block not in skipped]

    def _parts(self, pipe: Any, t5_length: int) -> list[tuple[Any, int, int]]:
        """(tokenizer, slot offset, length) of each part of the text sequence."""
        clip = pipe.tokenizer_max_length
        parts = [(t, 0, clip) for t in (pipe.tokenizer, pipe.tokenizer_2) if t is not None]
        if getattr(pipe, "text_encoder_3", None) is not None and getattr(pipe, "tokenizer_3", None) is not None:
            parts.append((pipe.tokenizer_3, clip, t5_length))
        return parts

    def encoding_options(self, pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        length = kwargs.get("max_sequence_length") or call_default(pipe, "max_sequence_length", 256)
        return {"clip_skip": kwargs.get("clip_skip"), "max_sequence_length": int(length)}

    def _slots(self, pipe: Any, text: str, concept_id: str, options: dict[str, Any]) -> tuple[list[int], list[int]]:
        own: set[int] = set()
        carried: set[int] = set()
        for tokenizer, offset, length in self._parts(pipe, options["max_sequence_length"]):
            ids, mine = concept_slots(tokenizer, text, concept_id, max_length=length)
            own.update(offset + i for i in mine)
            carried.update(ride_along_slots(ids, mine, tokenizer.eos_token_id, offset))
        return sorted(own), sorted(carried)

    def _encode_prompt(self, pipe: Any, texts: list[str], options: dict[str, Any]) -> torch.Tensor:
        embeds: torch.Tensor = pipe.encode_prompt(
            prompt=texts, prompt_2=None, prompt_3=None, device=pipe._execution_device,
            num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=options["clip_skip"],
            max_sequence_length=options["max_sequence_length"],
        )[0]
        return embeds

    def prompt_embeddings(self, result: Any, call_index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return result[0], result[1]  # (embeds, negative embeds, pooled, negative pooled)
