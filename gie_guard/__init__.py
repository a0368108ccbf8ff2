"""gie_guard: keep unwanted concepts out of text-to-image generations while they are
generated (GIE, "Growth Inhibitors for Erasure"), driven by YAML policies.

    from gie_guard import Guard
    guard = Guard(policy="nsfw")
    images = guard(pipe, prompt="...").images
"""

from .errors import (
    AdapterError,
    ConceptError,
    GuardedCallError,
    GuardError,
    PolicyError,
    PolicyNotFoundError,
    UnsupportedPipelineError,
)
from .guard import Guard, GuardedPipeline
from .metrics import GuardMetrics, SuppressionRule
from .policy import Policy, PolicySnapshot, load_policy
from .report import AppliedConcept, GuardReport
from .serving import start_metrics_server
from .verifiers import ContentBlockedError, Verifier

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "AppliedConcept",
    "ConceptError",
    "ContentBlockedError",
    "Guard",
    "GuardError",
    "GuardMetrics",
    "GuardReport",
    "GuardedCallError",
    "GuardedPipeline",
    "Policy",
    "PolicyError",
    "PolicyNotFoundError",
    "PolicySnapshot",
    "SuppressionRule",
    "UnsupportedPipelineError",
    "Verifier",
    "__version__",
    "load_policy",
    "start_metrics_server",
]
