"""Stable Diffusion 1.x/2.x and SDXL: UNet cross-attention (``attn2``) over CLIP states.

Concepts are encoded with the pipeline's own ``encode_prompt`` (SDXL: both encoders,
concatenated as the pipeline does); a concept's tokens are the non-special ids of every
tokenizer (SDXL: the union over both, since their states are concatenated slot by slot).
Classifier-free guidance stacks ``[negative; prompt]`` rows; the engine finds the prompt
rows by comparing each row with what ``encode_prompt`` returned, so PAG's third chunk and
ControlNet's guess mode need no special case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...errors import UnsupportedPipelineError
from .base import ConceptEncoding, Family, Site, concept_slots

__all__ = ["StableDiffusion", "StableDiffusionXL"]


def unet_sites(unet: Any) -> tuple[Site, ...]:  # a diffusers UNet2DConditionModel or ControlNetModel
    """The UNet's cross-attention layers in the order of ``unet.attn_processors`` (down
    blocks, up blocks, then the mid block): the order adapter features use."""
    sites: list[Site] = []
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        module = unet.get_submodule(name)
        if getattr(module, "is_cross_attention", False):
            sites.append(Site(name=name, module=module, kind="cross"))
    return tuple(sites)


class _UNetFamily(Family):
    denoiser_attr = "unet"
    default_map = "calibrated"  # measured on the shapes UNet (docs/families.md, "Which map")
    tokenizer_attrs = ("tokenizer", "tokenizer_2")
    text_encoder_attrs = ("text_encoder", "text_encoder_2")

    def check(self, pipe: Any) -> None:
        from diffusers import UNet2DConditionModel

        unet = self.denoiser(pipe)
        if not isinstance(unet, UNet2DConditionModel):
            raise UnsupportedPipelineError(
                f"cannot guard {type(pipe).__name__}: its 'unet' is {type(unet).__name__}, not a diffusers UNet2DConditionModel"
            )
        hid = getattr(unet.config, "encoder_hid_dim_type", None)
        if hid in ("text_proj", "text_image_proj"):  # the text reaching attn2 is projected: not supported yet
            raise UnsupportedPipelineError(f"cannot guard {type(pipe).__name__}: UNet encoder_hid_dim_type {hid!r}")
        if not self.tokenizers(pipe):
            raise UnsupportedPipelineError(f"cannot guard {type(pipe).__name__}: it has no tokenizer")
        super().check(pipe)

    def sites(self, pipe: Any) -> tuple[Site, ...]:
        return unet_sites(self.denoiser(pipe))

    def aux_models(self, pipe: Any) -> list[tuple[str, torch.nn.Module]]:
        controlnet = getattr(pipe, "controlnet", None)
        if controlnet is None:
            return []
        nets = list(getattr(controlnet, "nets", [controlnet]))  # MultiControlNetModel holds several
        return [(f"controlnet.{i}", net) for i, net in enumerate(nets) if unet_sites(net)]

    def aux_sites(self, pipe: Any) -> list[tuple[torch.nn.Module, tuple[Site, ...]]]:
        return [(model, tuple(Site(f"{prefix}.{s.name}", s.module, s.kind) for s in unet_sites(model)))
                for prefix, model in self.aux_models(pipe)]

    @staticmethod
    def tokenizers(pipe: Any) -> tuple[Any, ...]:
        return tuple(t for t in (getattr(pipe, name, None) for name in _UNetFamily.tokenizer_attrs) if t is not None)

    def positions(self, pipe: Any, text: str, concept_id: str, options: dict[str, Any]) -> tuple[int, ...]:
        convert = getattr(pipe, "maybe_convert_prompt", None)  # textual-inversion tokens expand like prompts do
        own: set[int] = set()
        for tokenizer in self.tokenizers(pipe):
            own.update(concept_slots(tokenizer, text, concept_id, convert=convert)[1])
        return tuple(sorted(own))

    def encode(self, pipe: Any, texts: Sequence[str], ids: Sequence[str], options: dict[str, Any]) -> ConceptEncoding:
        positions = tuple(self.positions(pipe, t, i, options) for t, i in zip(texts, ids))
        embeddings = self._encode(pipe, list(texts), options.get("clip_skip"))
        return ConceptEncoding(embeddings=embeddings.detach(), positions=positions)

    def _encode(self, pipe: Any, texts: list[str], clip_skip: int | None) -> torch.Tensor:
        embeddings: torch.Tensor = pipe.encode_prompt(texts, pipe._execution_device, 1, False, clip_skip=clip_skip)[0]
        return embeddings

    def prompt_embeddings(self, result: Any, call_index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return result[0], result[1]  # (prompt_embeds, negative_prompt_embeds[, pooled, negative pooled])


class StableDiffusion(_UNetFamily):
    name = "sd"
    pipelines = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionControlNetPipeline",
        "StableDiffusionControlNetImg2ImgPipeline",
        "StableDiffusionControlNetInpaintPipeline",
        "StableDiffusionAdapterPipeline",
        "StableDiffusionPAGPipeline",
        "StableDiffusionPAGImg2ImgPipeline",
        "StableDiffusionPAGInpaintPipeline",
        "StableDiffusionControlNetPAGPipeline",
    )


class StableDiffusionXL(_UNetFamily):
    name = "sdxl"
    pipelines = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
        "StableDiffusionXLControlNetPipeline",
        "StableDiffusionXLControlNetImg2ImgPipeline",
        "StableDiffusionXLControlNetInpaintPipeline",
        "StableDiffusionXLAdapterPipeline",
        "StableDiffusionXLPAGPipeline",
        "StableDiffusionXLPAGImg2ImgPipeline",
        "StableDiffusionXLPAGInpaintPipeline",
        "StableDiffusionXLControlNetPAGPipeline",
    )

    def _encode(self, pipe: Any, texts: list[str], clip_skip: int | None) -> torch.Tensor:
        embeddings: torch.Tensor = pipe.encode_prompt(
            prompt=texts, device=pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, clip_skip=clip_skip,
        )[0]
        return embeddings
