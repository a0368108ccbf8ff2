"""What gie_guard knows about each pipeline family: how it encodes text and where its
cross-attention is.

Supported: Stable Diffusion 1.x/2.x (text-to-image, img2img, inpainting) and SDXL
(text-to-image, img2img, inpainting). Anything else is refused with
:class:`~gie_guard.errors.UnsupportedPipelineError`: a safety layer never runs a generator
it cannot hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConceptError, UnsupportedPipelineError


@dataclass(frozen=True)
class Family:
    """How one pipeline class is guarded."""

    name: str  # "sd" (one text encoder) or "sdxl" (two, embeddings concatenated)
    pipeline_class: str


def _supported_classes() -> dict[type, str]:
    import diffusers

    names = {
        "StableDiffusionPipeline": "sd",
        "StableDiffusionImg2ImgPipeline": "sd",
        "StableDiffusionInpaintPipeline": "sd",
        "StableDiffusionXLPipeline": "sdxl",
        "StableDiffusionXLImg2ImgPipeline": "sdxl",
        "StableDiffusionXLInpaintPipeline": "sdxl",
    }
    return {getattr(diffusers, cls): fam for cls, fam in names.items() if hasattr(diffusers, cls)}


def detect_family(pipe: Any) -> Family:
    """The family of ``pipe``, or UnsupportedPipelineError saying why it cannot be guarded."""
    from diffusers import UNet2DConditionModel

    for cls, family in _supported_classes().items():
        if isinstance(pipe, cls):
            break
    else:
        supported = ", ".join(sorted(c.__name__ for c in _supported_classes()))
        raise UnsupportedPipelineError(
            f"cannot guard {type(pipe).__module__}.{type(pipe).__qualname__}: gie_guard hooks only "
            f"these diffusers pipelines (and their subclasses): {supported}. Nothing was generated."
        )
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        raise UnsupportedPipelineError(
            f"cannot guard {type(pipe).__name__}: its 'unet' is {type(unet).__name__}, "
            "not a diffusers UNet2DConditionModel"
        )
    if not cross_attention_layers(unet):
        raise UnsupportedPipelineError(
            f"cannot guard {type(pipe).__name__}: its UNet has no cross-attention layer"
        )
    if not tokenizers_of(pipe):
        raise UnsupportedPipelineError(f"cannot guard {type(pipe).__name__}: it has no tokenizer")
    return Family(name=family, pipeline_class=type(pipe).__name__)


def cross_attention_layers(unet: torch.nn.Module) -> tuple[str, ...]:
    """Processor names of the UNet's cross-attention layers, in the order of
    ``unet.attn_processors`` (down blocks, up blocks, then the mid block): the order adapter
    features and fingerprints use."""
    names = []
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(".processor"))
        if getattr(module, "is_cross_attention", False):
            names.append(name)
    return tuple(names)


def tokenizers_of(pipe: Any) -> tuple[Any, ...]:
    """The tokenizers whose token positions index the prompt embeddings (SDXL has two)."""
    return tuple(
        tok for tok in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if tok is not None
    )


def concept_token_positions(pipe: Any, text: str, concept_id: str) -> tuple[int, ...]:
    """Positions of the concept's own tokens in its encoding: every position whose id is not
    one of the tokenizer's special ids (start, end, padding). SDXL: the union over both
    tokenizers, since both encodings are concatenated position by position."""
    if not text or not text.strip():
        raise ConceptError("the concept text is empty", concept_id=concept_id)
    positions: set[int] = set()
    for tokenizer in tokenizers_of(pipe):
        prompt = text
        if hasattr(pipe, "maybe_convert_prompt"):  # textual-inversion tokens expand like prompts do
            prompt = pipe.maybe_convert_prompt(text, tokenizer)
        limit = tokenizer.model_max_length
        ids = tokenizer(prompt, padding="max_length", max_length=limit, truncation=False).input_ids
        if len(ids) > limit:
            raise ConceptError(
                f"the text {text!r} is {len(ids)} tokens long with its start and end tokens; "
                f"the pipeline's text encoder takes at most {limit}",
                concept_id=concept_id,
            )
        special = set(tokenizer.all_special_ids)
        positions.update(i for i, token in enumerate(ids) if token not in special)
    if not positions:
        raise ConceptError(f"the text {text!r} has no tokens besides special tokens", concept_id=concept_id)
    return tuple(sorted(positions))


@torch.no_grad()
def encode_concepts(pipe: Any, family: Family, texts: list[str], *, clip_skip: int | None = None) -> torch.Tensor:
    """Encode each concept on its own, as if it were a prompt, with the pipeline's own
    prompt encoder. Returns ``(C, T, D)``: C concepts, T token slots, D embedding width
    (SDXL: both encoders' widths, concatenated as the pipeline does)."""
    device = pipe._execution_device
    if family.name == "sdxl":
        embeds = pipe.encode_prompt(
            prompt=texts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=clip_skip,
        )[0]
    else:
        embeds = pipe.encode_prompt(
            texts,
            device,
            1,
            False,
            clip_skip=clip_skip,
        )[0]
    return embeds.detach()
