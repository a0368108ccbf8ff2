"""Compile concepts for one pipeline into a Plan: everything a guarded call needs that does
not change from call to call (concept encodings, token positions, per-token scales)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConceptError, GuardError
from .families import Family, concept_token_positions, cross_attention_layers, detect_family, encode_concepts


@dataclass(frozen=True)
class ConceptSpec:
    """One concept to inhibit: what is encoded (``text``) and how strongly (``scale`` = w)."""

    id: str
    text: str
    scale: float
    scale_source: str = "policy"

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) or self.scale < 0:
            raise ConceptError(f"scale must be a finite number >= 0, got {self.scale!r}", concept_id=self.id)


@dataclass(frozen=True)
class StepWindow:
    """Step ``i`` of ``n`` is inhibited when ``start * n <= i < end * n``."""

    start: float = 0.0
    end: float = 0.8

    def __post_init__(self) -> None:
        if not (0.0 <= self.start < self.end <= 1.0):
            raise GuardError(f"step window must satisfy 0 <= start < end <= 1, got [{self.start}, {self.end}]")

    def contains(self, step: int, total: int) -> bool:
        return self.start * total <= step < self.end * total


@dataclass(frozen=True, eq=False)
class Plan:
    """Concepts compiled for one pipeline. Treat as read-only; shared between calls."""

    family: Family
    concepts: tuple[ConceptSpec, ...]
    window: StepWindow
    layer_names: tuple[str, ...]  # cross-attention processors, UNet order
    token_positions: tuple[tuple[int, ...], ...]  # per concept: its own tokens' slots
    embeddings: torch.Tensor | None  # (C, T, D) concept encodings; None when C == 0
    token_scales: torch.Tensor | None  # (C, T): w on the concept's own tokens, 0 on special tokens
    compile_seconds: float = field(default=0.0)

    @property
    def is_empty(self) -> bool:
        return self.embeddings is None


def compile_plan(
    pipe: Any,
    concepts: list[ConceptSpec] | tuple[ConceptSpec, ...],
    window: StepWindow,
    *,
    clip_skip: int | None = None,
    family: Family | None = None,
) -> Plan:
    """Encode every concept once with the pipeline's own prompt encoder.

    Concepts whose scale is 0 are dropped: they would change nothing, and an empty plan
    leaves the pipeline's output bit-identical."""
    started = time.perf_counter()
    family = family or detect_family(pipe)
    layers = cross_attention_layers(pipe.unet)
    ids = [c.id for c in concepts]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ConceptError(f"concept ids must be unique; repeated: {', '.join(dup)}")
    active = tuple(c for c in concepts if c.scale > 0)
    positions = tuple(concept_token_positions(pipe, c.text, c.id) for c in concepts)
    positions = tuple(p for p, c in zip(positions, concepts) if c.scale > 0)
    if not active:
        return Plan(family, (), window, layers, (), None, None, time.perf_counter() - started)
    embeddings = encode_concepts(pipe, family, [c.text for c in active], clip_skip=clip_skip)
    scales = torch.zeros(embeddings.shape[:2], dtype=torch.float32)
    for row, (concept, slots) in enumerate(zip(active, positions)):
        scales[row, list(slots)] = float(concept.scale)
    return Plan(
        family=family,
        concepts=active,
        window=window,
        layer_names=layers,
        token_positions=positions,
        embeddings=embeddings,
        token_scales=scales,
        compile_seconds=time.perf_counter() - started,
    )
