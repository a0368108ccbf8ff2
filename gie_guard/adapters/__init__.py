"""Scale adapters: per-prompt suppression scales predicted from first-step cross-attention
(GIE section 4.2). See docs/adapters.md.

    from gie_guard.adapters import load_adapter, AdapterLibrary
    adapter = load_adapter("adapters/shapes-circle.safetensors", pipeline=pipe)
    guard = Guard(policy=..., adapters=["my_adapters/"])   # for `scale: auto` concepts
"""

from typing import Any

from .format import FORMAT_VERSION, AdapterHeader, load_adapter, read_header, save_adapter
from .model import Fingerprint, MLPAdapter, ScaleMLP, resolve_scales
from .selection import AdapterLibrary, AutoChoice, shipped_adapter_dir
from .features import AdapterScales, AutoScaleResult, check_feature_pass, measure_features, token_features

__all__ = [
    "FORMAT_VERSION",
    "AdapterHeader",
    "AdapterLibrary",
    "AdapterScales",
    "AutoChoice",
    "AutoScaleResult",
    "Fingerprint",
    "MLPAdapter",
    "ScaleMLP",
    "check_feature_pass",
    "load_adapter",
    "measure_features",
    "read_header",
    "resolve_scales",
    "save_adapter",
    "shipped_adapter_dir",
    "token_features",
]


def __getattr__(name: str) -> Any:
    if name == "ScaleAdapter":  # deprecated
        from .model import _deprecated_scale_adapter

        return _deprecated_scale_adapter(stacklevel=2)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
