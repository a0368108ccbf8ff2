"""Compile concepts for one pipeline into a Plan: everything a guarded call needs that does
not change from call to call (the family, the attention sites, the concept encodings,
token positions and per-token scales)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import ConceptError, ConfigurationError
from ..limits import MAX_CONCEPTS, MAX_SCALE, MIN_SCALE
from ..window import StepWindow
from .families import family_for
from .families.base import Family

__all__ = ["DEFAULT_REFERENCES", "MAPS", "ConceptMap", "ConceptSpec", "Plan", "Sink", "StepWindow", "compile_plan"]

# What competes with a concept's tokens for a query in its map M_c: "own" (the other slots of
# the concept's own encoding: the paper's rule, UNet families), "prompt" (the prompt's own
# columns: cross-attention DiTs with a text mask), "image" (a joint block's image keys).
Sink = Literal["own", "prompt", "image"]
# Joint families: how a concept's text states reach each block. "ride-along": its tokens travel
# through every block with the prompt (the default); "static": its tokens enter every block as
# they left the text embedder (a baseline for measurement: wrong after the first block).
TextStates = Literal["ride-along", "static"]
# Which of a concept's slots ride along: "own" (its own tokens and the end token) or "all".
Carry = Literal["own", "all"]
# How preservation anchors spare their neighbours: "compete" (an anchor's own tokens join each
# concept's softmax with zero values: where the anchor attracts a pixel, the concept's map
# shrinks), "project" (the concept's inhibitor values lose their component in the span of the
# anchors' values, per layer and head), "both", or "centroid" (the concept's inhibitor values
# minus the mean of the anchors' values: what tells the concept from them keeps its strength).
Preserve = Literal["compete", "project", "both", "centroid"]
# "auto": the mechanism measured best for the family (docs/precision.md): project on joint
# attention (SD3, Flux), compete on cross-attention (UNet, PixArt, Sana)
PreserveChoice = Literal["auto", "compete", "project", "both", "centroid"]
# ControlNets read the prompt through cross-attention of their own: "inhibit" puts the concepts'
# inhibitors there too (their residuals then do not carry the concept back), "skip" leaves them.
ControlNetMode = Literal["inhibit", "skip"]
SINKS = {"cross": ("own", "prompt"), "joint": ("image", "prompt")}
# Where a concept's map lets it inhibit (the specificity options, docs/precision.md):
# "gie" (the map M_c itself: the paper's rule), "calibrated" (relu(M_c - M_ref): only the
# excess of each own token's map over the reference texts' mean per-token map, the references
# riding alongside in the same softmax structure, so a word attended like any word inhibits
# nothing), "gated" (M_c, only at the image positions where the concept's mean per-token share
# exceeds the references', heads averaged: a localized gate), "output" (M_c, only at the image
# positions whose attention output is nearer, by dot product, the concept's own-token mean
# value at that layer than every reference's: the output of a pixel that read only the concept,
# after ConceptAttention's output-space saliency), "contrast" (relu(M_c -
# max_r M_r): only the excess over the strongest reference, for references that are the
# neighbours a concept must spare, e.g. its siblings)
ConceptMap = Literal["gie", "calibrated", "gated", "output", "contrast"]
MAPS = ("gie", "calibrated", "gated", "output", "contrast")
# The reference texts of calibrated, gated and output maps: common words that name no
# particular thing, so what they attract is what any word attracts.
DEFAULT_REFERENCES = ("thing", "object", "picture")


@dataclass(frozen=True)
class ConceptSpec:
    """One concept to inhibit: what is encoded (``text``) and how strongly (``scale`` = w)."""

    id: str
    text: str
    scale: float
    scale_source: str = "policy"
    anchors: tuple[str, ...] = ()  # texts of neighbours this concept must spare (preservation anchors)

    def __post_init__(self) -> None:
        s = self.scale
        if (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s <= MAX_SCALE
                or 0 < s < MIN_SCALE):
            raise ConceptError(f"scale must be 0 or a number in [{MIN_SCALE:g}, {MAX_SCALE:g}], got {s!r}",
                               concept_id=self.id)
        same = [a for a in self.anchors if " ".join(a.lower().split()) == " ".join(self.text.lower().split())]
        if same:
            raise ConceptError(f"preservation anchor {same[0]!r} is the concept itself: it would cancel the "
                               "concept's own inhibitor", concept_id=self.id)


@dataclass(frozen=True, eq=False)
class Plan:
    """Concepts compiled for one pipeline. Treat as read-only; shared between calls."""

    family: Family
    concepts: tuple[ConceptSpec, ...]
    window: StepWindow
    site_names: tuple[str, ...]  # attention sites, in the family's order
    token_positions: tuple[tuple[int, ...], ...]  # per concept: its own tokens' slots
    embeddings: torch.Tensor | None  # (C, T, D) concept encodings; None when C == 0
    token_scales: torch.Tensor | None  # (C, T): w on the concept's own tokens, 0 elsewhere
    ride_along: tuple[tuple[int, ...], ...] = ()  # joint families: slots carried per concept
    sink: Sink = "own"
    text_states: TextStates = "ride-along"
    # preservation anchors: (A, T, D) encodings, own-token slots, carried slots (joint), and
    # per concept the indices of the anchors it must spare
    anchor_embeddings: torch.Tensor | None = None
    anchor_positions: tuple[tuple[int, ...], ...] = ()
    anchor_ride_along: tuple[tuple[int, ...], ...] = ()
    concept_anchors: tuple[tuple[int, ...], ...] = ()
    preserve: Preserve = "compete"
    controlnet: ControlNetMode = "inhibit"
    # specificity: the map rule and, for the rules that compare, the reference texts' (R, T, D)
    # encodings, own-token slots and carried slots (joint)
    concept_map: ConceptMap = "gie"
    reference_embeddings: torch.Tensor | None = None
    reference_positions: tuple[tuple[int, ...], ...] = ()
    reference_ride_along: tuple[tuple[int, ...], ...] = ()
    compile_seconds: float = field(default=0.0)

    @property
    def is_empty(self) -> bool:
        return self.embeddings is None

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The attention sites (their module paths in the denoiser)."""
        return self.site_names

    @property
    def ride_along_spans(self) -> list[tuple[int, int]]:
        """Per concept, then per anchor, then per reference, its ``[lo, hi)`` within the tokens
        appended to the text."""
        spans, at = [], 0
        for slots in (*self.ride_along, *self.anchor_ride_along, *self.reference_ride_along):
            spans.append((at, at + len(slots)))
            at += len(slots)
        return spans

    def ride_along_tokens(self, denoiser: torch.nn.Module) -> torch.Tensor:
        """``(T_c, D)``: every concept's, then every anchor's, then every reference's carried
        slots, concatenated, on the denoiser's device (a new tensor: a call keeps it for its length)."""
        assert self.embeddings is not None
        weight = next(denoiser.parameters())
        parts = [self.embeddings[c, list(slots)] for c, slots in enumerate(self.ride_along)]
        if self.anchor_embeddings is not None:
            parts += [self.anchor_embeddings[a, list(s)] for a, s in enumerate(self.anchor_ride_along)]
        if self.reference_embeddings is not None:
            parts += [self.reference_embeddings[r, list(s)] for r, s in enumerate(self.reference_ride_along)]
        return torch.cat(parts).to(device=weight.device, dtype=weight.dtype)


def compile_plan(
    pipe: Any,
    concepts: list[ConceptSpec] | tuple[ConceptSpec, ...],
    window: StepWindow,
    *,
    clip_skip: int | None = None,
    options: dict[str, Any] | None = None,
    family: Family | None = None,
    sink: Sink | None = None,
    text_states: TextStates = "ride-along",
    carry: Carry = "own",
    preserve: PreserveChoice = "auto",
    controlnet: ControlNetMode = "inhibit",
    concept_map: ConceptMap | Literal["auto"] = "auto",
    references: tuple[str, ...] | None = None,
) -> Plan:
    """Encode every concept once with the pipeline's own prompt encoder.

    ``options`` are the call's encoding settings (``Family.encoding_options``; default: the
    pipeline's defaults, with ``clip_skip``). Concepts whose scale is 0 are dropped: they would
    change nothing, and an empty plan leaves the pipeline's output bit-identical.
    ``concept_map`` ("auto": the family's default) and ``references`` (default
    ``DEFAULT_REFERENCES``) choose how specific each concept's inhibition is."""
    started = time.perf_counter()
    family = family or family_for(pipe)
    options = family.encoding_options(pipe, {"clip_skip": clip_skip, **(options or {})})
    sink = sink or family.default_sink  # type: ignore[assignment]
    allowed = SINKS["joint" if family.joint else "cross"]
    if sink not in allowed:
        raise ConfigurationError(f"sink {sink!r} does not apply to {family.name} pipelines (one of: {', '.join(allowed)})")
    sites = tuple(s.name for s in family.sites(pipe))
    ids = [c.id for c in concepts]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ConceptError(f"concept ids must be unique; repeated: {', '.join(dup)}")
    active = tuple(c for c in concepts if c.scale > 0)
    if len(active) > MAX_CONCEPTS:
        raise ConceptError(f"{len(active)} concepts to inhibit; at most {MAX_CONCEPTS} fit one plan")
    if controlnet not in ("inhibit", "skip"):
        raise ConfigurationError(f"controlnet must be inhibit or skip, got {controlnet!r}")
    if preserve not in ("auto", "compete", "project", "both", "centroid"):
        raise ConfigurationError(f"preserve must be auto, compete, project, both or centroid, got {preserve!r}")
    mechanism: Preserve = preserve if preserve != "auto" else ("project" if family.joint else "compete")
    chosen: ConceptMap = family.default_map if concept_map == "auto" else concept_map  # type: ignore[assignment]
    if chosen not in MAPS:
        raise ConfigurationError(f"concept_map must be auto or one of {', '.join(MAPS)}, got {concept_map!r}")
    reference_texts = tuple(DEFAULT_REFERENCES if references is None else references)
    if chosen != "gie" and not reference_texts:
        raise ConfigurationError(f"concept_map {chosen!r} compares with reference texts; none were given")
    if text_states not in ("ride-along", "static") or carry not in ("own", "all"):
        raise ConfigurationError(f"text_states must be ride-along or static and carry own or all, got {text_states!r}, {carry!r}")
    for c in concepts:  # a concept at scale 0 today must still be one this pipeline can encode
        if c.scale == 0:
            family.positions(pipe, c.text, c.id, options)
    if not active:
        return Plan(family, (), window, sites, (), None, None, sink=sink, compile_seconds=time.perf_counter() - started)
    encoding = family.encode(pipe, [c.text for c in active], [c.id for c in active], options)
    embeddings = encoding.embeddings
    scales = torch.zeros(embeddings.shape[:2], dtype=torch.float32)
    for row, (concept, slots) in enumerate(zip(active, encoding.positions)):
        scales[row, list(slots)] = float(concept.scale)
    anchor_texts = list(dict.fromkeys(a for c in active for a in c.anchors))
    anchors = None
    if anchor_texts:
        anchors = family.encode(pipe, anchor_texts, [f"anchor:{t}" for t in anchor_texts], options)
    refs = None
    if chosen != "gie":
        refs = family.encode(pipe, list(reference_texts), [f"reference:{t}" for t in reference_texts], options)
    return Plan(
        family=family,
        concepts=active,
        window=window,
        site_names=sites,
        token_positions=encoding.positions,
        embeddings=embeddings,
        token_scales=scales,
        ride_along=(tuple(tuple(range(embeddings.shape[1])) for _ in active) if carry == "all" and family.joint
                    else encoding.ride_along or ()),
        sink=sink,
        text_states=text_states,
        anchor_embeddings=anchors.embeddings if anchors is not None else None,
        anchor_positions=anchors.positions if anchors is not None else (),
        anchor_ride_along=(anchors.ride_along or ()) if anchors is not None else (),
        concept_anchors=tuple(tuple(anchor_texts.index(a) for a in dict.fromkeys(c.anchors)) for c in active),
        preserve=mechanism,
        controlnet=controlnet,
        concept_map=chosen,
        reference_embeddings=refs.embeddings if refs is not None else None,
        reference_positions=refs.positions if refs is not None else (),
        reference_ride_along=(refs.ride_along or ()) if refs is not None else (),
        compile_seconds=time.perf_counter() - started,
    )
