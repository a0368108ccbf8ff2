"""The policy file format as pydantic models: what an operator may write, and nothing else.

The models are immutable and reject unknown keys, so a typo (``scael: 3``) is an error
instead of a silently ignored setting. Cross-field problems are raised as
``PydanticCustomError`` with a ``path`` in their context, so the loader can point at the
exact key (``concepts[3].id``) and its line.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..limits import MAX_SCALE, MIN_SCALE

__all__ = [
    "DEFAULT_DEDUP_THRESHOLD",
    "DEFAULT_INHIBIT_STEPS",
    "AutoScale",
    "Category",
    "Concept",
    "Policy",
    "Presence",
    "PreserveBy",
    "ScaleSpec",
    "Verify",
]

DEFAULT_INHIBIT_STEPS = (0.0, 0.8)
# Cosine distance under all-MiniLM-L6-v2. 0.30 sits between the widest synonym pair we
# must merge (naked/nudity 0.284) and the closest distinct pair we must keep (car/truck
# 0.311, cat/dog 0.339); docs/policies.md has the measured table.
DEFAULT_DEDUP_THRESHOLD = 0.30

Category = Literal["nsfw", "style", "object", "custom"]

# Ids and names end up as metric labels and in file names, so keep them to a safe alphabet.
_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Identifier = Annotated[str, Strict(), StringConstraints(pattern=_ID_PATTERN)]
Text = Annotated[str, Strict(), StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
# Scales (fixed, and auto min/max/fallback) are bounded: beyond MAX_SCALE the inhibitor
# swamps the layer output and half-precision activations overflow (gie_guard/limits.py).
def _zero_or_representable(value: float) -> float:
    if 0.0 < value < MIN_SCALE:
        raise PydanticCustomError(
            "scale_too_small", "a positive scale must be at least {minimum} (0 turns the concept off)",
            {"minimum": MIN_SCALE},
        )
    return value


Number = Annotated[
    float, Strict(), Field(ge=0.0, le=MAX_SCALE, allow_inf_nan=False), AfterValidator(_zero_or_representable)
]
Fraction = Annotated[float, Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class AutoScale(_Frozen):
    """Let the scale adapter choose the scale, within ``[min, max]``.

    ``fallback`` is used when no adapter is available for the pipeline (and
    ``on_missing_adapter`` is ``fallback``). In a concept, keys left out are taken from the
    policy's ``auto_scale``; ``model_fields_set`` tells which were written.
    """

    auto: Literal[True] = True
    fallback: Number = 5.0
    min: Number = 0.0
    max: Number = 20.0

    @model_validator(mode="after")
    def _ordered(self) -> AutoScale:
        written = self.model_fields_set
        if {"min", "max"} <= written and self.min > self.max:
            raise PydanticCustomError("scale_range", "min is above max")
        return self

    def within(self, defaults: AutoScale) -> AutoScale:
        """Fill the keys this mapping left out from ``defaults`` (the policy's ``auto_scale``)."""
        values = {k: getattr(self if k in self.model_fields_set else defaults, k) for k in ("fallback", "min", "max")}
        return AutoScale(**values)


def _scale_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "word"
    if isinstance(value, (dict, AutoScale)):
        return "mapping"
    return None


# The tags carry a ':' so the loader can drop them from error locations (field names never do).
ScaleSpec = Annotated[
    Union[
        Annotated[Number, Tag("scale:number")],
        Annotated[Literal["auto"], Tag("scale:word")],
        Annotated[AutoScale, Tag("scale:mapping")],
    ],
    Discriminator(
        lambda v: None if (kind := _scale_kind(v)) is None else f"scale:{kind}",
        custom_error_type="scale_type",
        custom_error_message="must be a number >= 0, `auto`, or a mapping {auto: true, fallback, min, max}",
    ),
]


class Verify(_Frozen):
    """Check the output for this concept after generation (see docs/observability.md).

    ``verifier`` names a verifier the Guard knows (``nudenet``, ``shapes``, or one passed as
    ``Guard(verifiers={...})``); ``labels`` are the verifier's labels that mean this concept
    (default: the concept id); ``action`` on a residual detection: ``record`` (count only),
    ``blur`` (blur the affected images) or ``block`` (raise ``ContentBlockedError``).
    """

    verifier: Identifier
    labels: tuple[Identifier, ...] = ()
    action: Literal["record", "blur", "block"] = "record"


# How preservation anchors spare a concept's neighbours (gie_guard/engine/plan.py, docs/precision.md):
# "compete" (anchors compete with the concept for pixels), "project" (inhibitor values lose their
# component along the anchors' values), "both", "centroid" (inhibitor values minus the mean of the
# anchors' values: only what tells the concept from its anchors is removed); "auto" (default): the
# family's measured best, project on joint attention (SD3, Flux), compete elsewhere.
PreserveBy = Literal["auto", "compete", "project", "both", "centroid"]


class Presence(_Frozen):
    """Presence gating (docs/precision.md): from the first step's attention, decide per image
    whether the concept is there. ``mode``: ``off``; ``gate`` (inhibit only in images whose
    presence reaches ``threshold``); ``scale`` (scale by ``min(1, presence / threshold)``).
    The threshold is a share of attention and depends on the model: measure it
    (``benchmarks/erasure.py --gate``); there is no default."""

    mode: Literal["off", "gate", "scale"]
    threshold: Annotated[float, Strict(), Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None

    @field_validator("mode", mode="before")
    @classmethod
    def _unquoted_off(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `off` as false; `mode: off` means what it says
        return "off" if value is False else value

    @model_validator(mode="after")
    def _threshold_given(self) -> Presence:
        if self.mode != "off" and self.threshold is None:
            raise PydanticCustomError("presence_threshold", "mode {mode} needs a threshold (a share of attention in (0, 1]; "
                                      "measure it on your model)", {"mode": self.mode})
        return self


class Concept(_Frozen):
    """One concept to inhibit. ``aliases`` are extra texts inhibited as concepts of their own;
    ``preserve`` are neighbours its inhibition must spare (preservation anchors)."""

    id: Identifier
    text: Text
    category: Category = "custom"
    aliases: tuple[Text, ...] = ()
    scale: ScaleSpec = "auto"
    enabled: Annotated[bool, Strict()] = True
    verify: Verify | None = None  # optional check of the output after generation
    preserve: tuple[Text, ...] = ()
    presence: Presence | None = None  # None: the policy's

    @model_validator(mode="after")
    def _anchors_differ(self) -> Concept:
        own = {folded_text(self.text)} | {folded_text(a) for a in self.aliases}
        for i, anchor in enumerate(self.preserve):
            if folded_text(anchor) in own:
                raise PydanticCustomError(
                    "anchor_is_concept", "this preservation anchor is the concept itself (its text or an alias, "
                    "ignoring case and spacing): it would cancel the concept's own inhibitor", {"path": ("preserve", i)},
                )
        return self


def folded_text(text: str) -> str:
    """Text compared as the same anchor or concept: case and runs of spacing ignored."""
    return " ".join(text.lower().split())


class Policy(_Frozen):
    """A policy file. See docs/policies.md for every key."""

    # the operator's revision label of this policy (shown in metrics and reports), free text
    version: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=64)] = "1"
    name: Identifier
    description: Annotated[str, Strict(), StringConstraints(max_length=2000)] = ""
    include: tuple[Annotated[str, Strict(), StringConstraints(min_length=1)], ...] = ()
    inhibit_steps: tuple[Fraction, Fraction] = DEFAULT_INHIBIT_STEPS
    dedup_threshold: Annotated[float, Strict(), Field(ge=0.0, le=2.0, allow_inf_nan=False)] = DEFAULT_DEDUP_THRESHOLD
    on_missing_adapter: Literal["fallback", "error"] = "fallback"
    auto_scale: AutoScale = AutoScale()
    preserve: tuple[Text, ...] = ()  # anchors every concept spares
    preserve_by: PreserveBy = "auto"
    presence: Presence = Presence(mode="off")  # each concept's default
    # a ControlNet's own cross-attention: inhibit the concepts there too, or leave it alone
    controlnet: Literal["inhibit", "skip"] = "inhibit"
    concepts: tuple[Concept, ...] = ()
    # a live policy with concepts may be replaced by one with none only when the new one says so
    allow_empty: Annotated[bool, Strict()] = False

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        # `version: 3` or `version: 1.2` are numbers to YAML; accept them as the text they obviously are.
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("inhibit_steps")
    @classmethod
    def _window(cls, value: tuple[float, float]) -> tuple[float, float]:
        start, end = value
        if not start < end:
            raise PydanticCustomError(
                "step_window", "start must be below end; both are fractions of the denoising steps",
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        first_seen: dict[str, int] = {}
        for i, concept in enumerate(self.concepts):
            if concept.id in first_seen:
                raise PydanticCustomError(
                    "duplicate_id", "duplicate concept id (first used by concepts[{first}])",
                    {"first": first_seen[concept.id], "path": ("concepts", i, "id")},
                )
            first_seen[concept.id] = i
            auto = self.resolved_auto(concept)
            if auto is not None and not auto.min <= auto.fallback <= auto.max:
                raise PydanticCustomError(
                    "scale_range", "auto scale needs min <= fallback <= max (with the policy's auto_scale filled in)",
                    {"path": ("concepts", i, "scale")},
                )
        erased = {folded_text(t): i for i, c in enumerate(self.concepts) if c.enabled for t in (c.text, *c.aliases)}
        anchors: list[tuple[str, tuple[str | int, ...]]] = [(a, ("preserve", i)) for i, a in enumerate(self.preserve)]
        anchors += [(a, ("concepts", ci, "preserve", i)) for ci, c in enumerate(self.concepts) for i, a in enumerate(c.preserve)]
        for anchor, path in anchors:
            if folded_text(anchor) in erased:
                raise PydanticCustomError(
                    "anchor_is_concept", "this preservation anchor is erased by concepts[{index}] (same text, ignoring "
                    "case and spacing): a text cannot be both erased and preserved",
                    {"index": erased[folded_text(anchor)], "path": path},
                )
        own = self.auto_scale
        if not own.min <= own.fallback <= own.max:
            raise PydanticCustomError(
                "scale_range", "needs min <= fallback <= max", {"path": ("auto_scale",)},
            )
        return self

    def resolved_auto(self, concept: Concept) -> AutoScale | None:
        """The concept's auto-scale settings with this policy's defaults filled in; None if fixed."""
        if isinstance(concept.scale, float):
            return None
        if isinstance(concept.scale, AutoScale):
            return concept.scale.within(self.auto_scale)
        return self.auto_scale
