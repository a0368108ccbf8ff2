"""PixArt-Sigma (and -Alpha) and Sana: cross-attention DiTs over T5 / Gemma states with a
text attention mask.

The cross-attention (``attn2`` of every transformer block) sees the caption projected by
the transformer (``caption_projection``; Sana also ``caption_norm``), so concept keys and
values are computed from the concept's encoding passed through the same projection.

Masked pads and the concept's map. The prompt's softmax runs over its real tokens and the
end token only (pads are masked). A concept map with its own masked softmax would sum to 1
over a few columns at every pixel (no sink: the inhibitor acts everywhere); one over all of
the concept's slots would use pad keys the model never learned to attend to. The default
(``sink="prompt"``) inserts the concept's own tokens into the prompt's masked softmax, the
literal eq. 8 with the prompt's columns as the sink: ``M_c[j] = exp(s_j) / (Z_prompt +
sum_k exp(s_k))`` over the concept's own tokens ``k``. ``sink="own"`` (the concept's own
softmax over every slot, pads included) is kept for measurement. docs/families.md has the
numbers behind the choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ...errors import ConceptError
from ..cross import CrossHandler, NormPlace
from ..sites import SiteHandler, SiteKind
from .base import ConceptEncoding, Family, Site, call_default, concept_slots

__all__ = ["PixArt", "Sana"]


class PixArt(Family):
    name = "pixart"
    pipelines: ClassVar[tuple[str, ...]] = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    default_sink = "prompt"
    fused_projections = False  # the prompt sink reads the prompt's keys from to_k, which fusing bypasses
    lora_scale_kwarg: ClassVar[str | None] = None  # the pipelines take no attention kwargs

    def sites(self, pipe: Any) -> tuple[Site, ...]:
        model = self.denoiser(pipe)
        sites = []
        for i, block in enumerate(getattr(model, "transformer_blocks", ())):
            attn = getattr(block, "attn2", None)
            if attn is not None:
                sites.append(Site(name=f"transformer_blocks.{i}.attn2", module=attn, kind="cross", block=i))
        return tuple(sites)

    def text_for_sites(self, denoiser: torch.nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
        weight = next(denoiser.parameters())
        x = embeddings.to(device=weight.device, dtype=weight.dtype)
        projection = getattr(denoiser, "caption_projection", None)
        if projection is not None:
            x = projection(x)
        norm = getattr(denoiser, "caption_norm", None)
        if norm is not None:
            x = norm(x)
        return x

    def encoding_options(self, pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        length = kwargs.get("max_sequence_length") or call_default(pipe, "max_sequence_length", 300)
        return {"max_sequence_length": int(length)}

    def positions(self, pipe: Any, text: str, concept_id: str, options: dict[str, Any]) -> tuple[int, ...]:
        length = options["max_sequence_length"]
        return tuple(concept_slots(pipe.tokenizer, text, concept_id, max_length=length, padding_side="right")[1])

    def encode(self, pipe: Any, texts: Sequence[str], ids: Sequence[str], options: dict[str, Any]) -> ConceptEncoding:
        positions = tuple(self.positions(pipe, t, i, options) for t, i in zip(texts, ids))
        embeds = pipe.encode_prompt(
            list(texts), do_classifier_free_guidance=False, device=pipe._execution_device,
            max_sequence_length=options["max_sequence_length"],
        )[0]
        return ConceptEncoding(embeddings=embeds.detach(), positions=positions)

    def prompt_embeddings(self, result: Any, call_index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return result[0], result[2]  # (embeds, mask, negative embeds, negative mask)


def _sana_processors() -> dict[type, NormPlace]:
    """Sana's own cross-attention processor, which applies q/k norms before splitting heads."""
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

    return {SanaAttnProcessor2_0: "inner"}


class Sana(PixArt):
    name = "sana"
    pipelines = ("SanaPipeline",)
    lora_scale_kwarg = "attention_kwargs"

    def site_handlers(self) -> dict[SiteKind, SiteHandler]:
        return {"cross": CrossHandler(extra=_sana_processors)}

    def encoding_options(self, pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        options = super().encoding_options(pipe, kwargs)
        instruction = kwargs.get("complex_human_instruction", call_default(pipe, "complex_human_instruction", None))
        options["complex_human_instruction"] = tuple(instruction) if instruction else None
        return options

    def positions(self, pipe: Any, text: str, concept_id: str, options: dict[str, Any]) -> tuple[int, ...]:
        """Sana prefixes an instruction, tokenizes to ``instruction + max_length - 2`` and keeps
        slot 0 and the last ``max_length - 1`` slots: map the concept's tokens through that."""
        tokenizer = pipe.tokenizer
        length = options["max_sequence_length"]
        instruction = options["complex_human_instruction"]
        if not instruction:
            return tuple(concept_slots(tokenizer, text, concept_id, max_length=length, padding_side="right")[1])
        prefix = "\n".join(instruction)
        total = len(tokenizer.encode(prefix)) + length - 2
        ids, own = concept_slots(tokenizer, prefix + text, concept_id, max_length=total, padding_side="right")
        alone = tokenizer(prefix).input_ids
        start = next((i for i, (a, b) in enumerate(zip(alone, ids)) if a != b), len(alone))  # where the text begins
        keep = [0] + list(range(total - length + 1, total))
        slot = {old: new for new, old in enumerate(keep)}
        mine = [slot[i] for i in own if i >= start and i in slot]
        if not mine:
            raise ConceptError(f"the text {text!r} has no tokens left after Sana's instruction prefix", concept_id=concept_id)
        return tuple(mine)

    def encode(self, pipe: Any, texts: Sequence[str], ids: Sequence[str], options: dict[str, Any]) -> ConceptEncoding:
        positions = tuple(self.positions(pipe, t, i, options) for t, i in zip(texts, ids))
        instruction = options["complex_human_instruction"]
        embeds = pipe.encode_prompt(
            list(texts), do_classifier_free_guidance=False, device=pipe._execution_device,
            max_sequence_length=options["max_sequence_length"],
            complex_human_instruction=list(instruction) if instruction else None,
        )[0]
        return ConceptEncoding(embeddings=embeds.detach(), positions=positions)
