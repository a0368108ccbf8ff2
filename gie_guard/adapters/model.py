"""The scale adapter's network and the object that wraps it with its metadata.

An adapter maps a concept token's first-step attention profile (one value per
cross-attention layer, UNet order) to a suppression scale. The network is the paper's
MLP ``L -> 64 -> 32 -> 1`` with ReLU; features are standardised with the training set's
mean and spread, and the output is in units of the adapter's scale range
(``scale = lo + (hi - lo) * out``), so the same learning rate works for any range.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import AdapterError

__all__ = ["Fingerprint", "MLPAdapter", "ScaleMLP", "resolve_scales"]


@runtime_checkable
class _ScaleAdapter(Protocol):
    """Deprecated (nothing in gie_guard uses it; adapters are :class:`MLPAdapter`), kept
    importable as ``ScaleAdapter`` with a DeprecationWarning until it is removed."""

    def predict(self, features: torch.Tensor) -> torch.Tensor: ...


def _deprecated_scale_adapter(stacklevel: int) -> type[_ScaleAdapter]:
    warnings.warn(
        "gie_guard.adapters.ScaleAdapter is deprecated and will be removed: nothing uses it; "
        "scale adapters are MLPAdapter objects",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )
    return _ScaleAdapter


def __getattr__(name: str) -> Any:
    if name == "ScaleAdapter":
        return _deprecated_scale_adapter(stacklevel=2)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ScaleMLP(nn.Module):
    """``L -> 64 -> 32 -> 1``, ReLU (GIE section 4.2)."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, L) -> (n,)
        out: torch.Tensor = self.net(x)
        return out.squeeze(-1)


@dataclass(frozen=True)
class Fingerprint:
    """What a pipeline must have for an adapter's features to mean the same thing: its
    attention sites, in the family's order (UNet: cross-attention layers), and the width of the text they read
    (which tells SD 1.x (768) from SD 2.x (1024) and a toy model, whose layer names agree)."""

    layer_names: tuple[str, ...]
    cross_attention_dims: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.layer_names) != len(self.cross_attention_dims):
            raise AdapterError(
                f"fingerprint has {len(self.layer_names)} layer names but {len(self.cross_attention_dims)} dims"
            )

    @property
    def layer_count(self) -> int:
        return len(self.layer_names)

    @property
    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer_names": list(self.layer_names),
            "layer_count": self.layer_count,
            "cross_attention_dims": list(self.cross_attention_dims),
        }

    @classmethod
    def from_dict(cls, data: Any, *, file: str | None = None) -> Fingerprint:
        try:
            names = tuple(str(n) for n in data["layer_names"])
            dims = tuple(int(d) for d in data["cross_attention_dims"])
            count = int(data["layer_count"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterError(f"malformed fingerprint in metadata ({type(exc).__name__}: {exc})", file=file) from None
        if count != len(names):
            raise AdapterError(f"fingerprint says {count} layers but lists {len(names)} names", file=file)
        return cls(names, dims)

    @classmethod
    def of_pipeline(cls, pipe: Any) -> Fingerprint:
        """The pipeline's attention sites (processor names, in the family's order) and the
        width of the text each reads."""
        from ..engine import family_for

        sites = family_for(pipe).sites(pipe)
        names = tuple(f"{s.name}.processor" for s in sites)
        dims = tuple(int((s.module.to_k if s.kind == "cross" else s.module.add_k_proj).in_features)
                     if s.kind != "single" else int(s.module.to_k.in_features) for s in sites)
        return cls(names, dims)

    def mismatch(self, other: Fingerprint) -> str | None:
        """None when equal; otherwise what differs, in words."""
        if self == other:
            return None
        if self.layer_count != other.layer_count:
            return f"{self.layer_count} cross-attention layers in the adapter, {other.layer_count} in the pipeline"
        for i, (name, other_name) in enumerate(zip(self.layer_names, other.layer_names)):
            if name != other_name:
                return f"layer {i} is {name!r} in the adapter but {other_name!r} in the pipeline"
        for i, (dim, other_dim) in enumerate(zip(self.cross_attention_dims, other.cross_attention_dims)):
            if dim != other_dim:
                return f"layer {i} reads {dim}-wide text embeddings in the adapter but {other_dim}-wide in the pipeline"
        return "fingerprints differ"  # pragma: no cover


def resolve_scales(raw: torch.Tensor, *, lo: float, hi: float, fallback: float) -> tuple[torch.Tensor, bool]:
    """The documented rule for turning predictions into scales (docs/adapters.md):

    NaN -> ``fallback`` (the policy's fallback scale), +inf -> ``hi``, -inf -> ``lo``; then
    everything is clamped to ``[lo, hi]``. Returns the scales and whether any prediction was
    non-finite (the report says so)."""
    raw = raw.detach().float()
    nonfinite = bool((~torch.isfinite(raw)).any())
    scales = torch.nan_to_num(raw, nan=fallback, posinf=hi, neginf=lo).clamp(lo, hi)
    return scales, nonfinite


@dataclass(frozen=True, eq=False)
class MLPAdapter:
    """A loaded (or freshly trained) adapter: the MLP, its normalisation and metadata."""

    name: str
    fingerprint: Fingerprint
    categories: tuple[str, ...]
    scale_range: tuple[float, float]
    model: ScaleMLP
    feature_mean: torch.Tensor  # (L,)
    feature_std: torch.Tensor  # (L,)
    concepts: tuple[str, ...] = ()  # concept texts it was trained on
    training: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
            raise AdapterError(f"scale range must satisfy 0 <= lo <= hi, got {self.scale_range}", file=self.path)
        n = self.fingerprint.layer_count
        if self.feature_mean.shape != (n,) or self.feature_std.shape != (n,):
            raise AdapterError(
                f"feature normalisation has shapes {tuple(self.feature_mean.shape)}/{tuple(self.feature_std.shape)}, "
                f"expected ({n},) for {n} cross-attention layers",
                file=self.path,
            )

    @property
    def n_features(self) -> int:
        return self.fingerprint.layer_count

    @property
    def label(self) -> str:
        """``name@digest8``: how reports name it."""
        return f"{self.name}@{self.fingerprint.digest[:8]}"

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Raw scales ``(n,)`` for features ``(n, L)``; not clamped, possibly non-finite."""
        features = torch.as_tensor(features)
        if features.ndim == 1:
            features = features[None]
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise AdapterError(
                f"adapter {self.name!r} expects {self.n_features} features per token (one per cross-attention "
                f"layer), got shape {tuple(features.shape)}",
                file=self.path,
            )
        x = (features.float().cpu() - self.feature_mean) / self.feature_std
        lo, hi = self.scale_range
        raw: torch.Tensor = self.model(x)
        return lo + (hi - lo) * raw

    def __repr__(self) -> str:
        return (
            f"MLPAdapter(name={self.name!r}, layers={self.n_features}, categories={list(self.categories)}, "
            f"scale_range={self.scale_range}, path={self.path!r})"
        )
