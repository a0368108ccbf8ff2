"""The GIE engine: compile concepts for a pipeline, install growth-inhibitor processors."""

from .families import Family, cross_attention_layers, detect_family
from .plan import ConceptSpec, Plan, StepWindow, compile_plan
from .processors import CallState, GrowthInhibitorProcessor
from .session import installed

__all__ = [
    "CallState",
    "ConceptSpec",
    "Family",
    "GrowthInhibitorProcessor",
    "Plan",
    "StepWindow",
    "compile_plan",
    "cross_attention_layers",
    "detect_family",
    "installed",
]
