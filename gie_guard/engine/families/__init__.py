"""The registry of pipeline families: ``family_for(pipe)`` or UnsupportedPipelineError.

Adding a family is one module with a :class:`~.base.Family` subclass, listed in
``FAMILIES``, and its tests; nothing outside ``engine/families`` names a family.
"""

from __future__ import annotations

from typing import Any

from ...errors import UnsupportedPipelineError
from .base import ConceptEncoding, Family, Site, describe
from .chroma import Chroma
from .flux import Flux
from .pixart import PixArt, Sana
from .sd3 import StableDiffusion3
from .unet import StableDiffusion, StableDiffusionXL

__all__ = ["FAMILIES", "ConceptEncoding", "Family", "Site", "family_for", "supported_pipelines"]

FAMILIES: tuple[type[Family], ...] = (StableDiffusion, StableDiffusionXL, PixArt, Sana, StableDiffusion3, Flux, Chroma)

# Transformer pipelines people ask for that the engine does not guard yet, and why.
NOT_YET: dict[str, str] = {
    "Flux2Pipeline": "Flux.2's transformer (Mistral text states, new block layout) has no gie_guard family yet",
    "ChromaInpaintPipeline": "Chroma's inpainting pipeline is not covered by gie_guard's chroma family yet",
    "QwenImagePipeline": "Qwen-Image's dual-stream transformer has no gie_guard family yet",
    "HiDreamImagePipeline": "HiDream's transformer has no gie_guard family yet",
    "AuraFlowPipeline": "AuraFlow's transformer has no gie_guard family yet",
    "Lumina2Pipeline": "Lumina 2's transformer has no gie_guard family yet",
    "CogView4Pipeline": "CogView4's transformer has no gie_guard family yet",
}


def supported_pipelines() -> list[str]:
    return sorted({name for family in FAMILIES for name in family.pipelines})


def family_for(pipe: Any) -> Family:
    """The family that guards ``pipe`` (checked), or UnsupportedPipelineError saying why not."""
    cls_name = type(pipe).__name__
    for family_cls in FAMILIES:
        if family_cls.matches(pipe):
            for base in type(pipe).__mro__:
                reason = family_cls.refused.get(base.__name__)
                if reason:
                    raise UnsupportedPipelineError(f"cannot guard {describe(pipe)}: {reason}. Nothing was generated.")
            family = family_cls(cls_name)
            family.check(pipe)
            return family
    reason = next((NOT_YET[b.__name__] for b in type(pipe).__mro__ if b.__name__ in NOT_YET), None)
    supported = ", ".join(supported_pipelines())
    why = f"{reason}; " if reason else ""
    raise UnsupportedPipelineError(
        f"cannot guard {describe(pipe)}: {why}gie_guard hooks only these diffusers pipelines (and their "
        f"subclasses): {supported}. Nothing was generated."
    )
