"""gie_guard: keep unwanted concepts out of text-to-image generations while they are
generated (GIE, "Growth Inhibitors for Erasure"), driven by YAML policies.

    from gie_guard import Guard
    guard = Guard(policy="nsfw")
    images = guard(pipe, prompt="...").images

Importing ``gie_guard`` imports only its errors: every other public name is loaded on first
use (PEP 562), so ``gie-guard policy check`` runs without torch, diffusers or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AdapterError,
    ConceptError,
    ConfigurationError,
    ContentBlockedError,
    GuardedCallError,
    GuardError,
    MissingDependencyError,
    PolicyError,
    PolicyNotFoundError,
    UnguardedUseError,
    UnsupportedPipelineError,
)

if TYPE_CHECKING:
    from .detectors import Detector
    from .guard import Guard, GuardedPipeline
    from .logs import install_log_filters
    from .metrics import GuardMetrics, SuppressionRule
    from .policy import Policy, PolicySnapshot, load_policy
    from .report import AppliedConcept, GuardReport
    from .serving import start_metrics_server
    from .verifiers import Verifier

__version__ = "0.2.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "AppliedConcept": ".report",
    "Detector": ".detectors",
    "Guard": ".guard",
    "GuardMetrics": ".metrics",
    "GuardReport": ".report",
    "GuardedPipeline": ".guard",
    "Policy": ".policy",
    "PolicySnapshot": ".policy",
    "SuppressionRule": ".metrics",
    "Verifier": ".verifiers",
    "install_log_filters": ".logs",
    "load_policy": ".policy",
    "start_metrics_server": ".serving",
}

__all__ = [
    "AdapterError",
    "AppliedConcept",
    "ConceptError",
    "ConfigurationError",
    "ContentBlockedError",
    "Detector",
    "Guard",
    "GuardError",
    "GuardMetrics",
    "GuardReport",
    "GuardedCallError",
    "GuardedPipeline",
    "MissingDependencyError",
    "Policy",
    "PolicyError",
    "PolicyNotFoundError",
    "PolicySnapshot",
    "SuppressionRule",
    "UnguardedUseError",
    "UnsupportedPipelineError",
    "Verifier",
    "__version__",
    "install_log_filters",
    "load_policy",
    "start_metrics_server",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
