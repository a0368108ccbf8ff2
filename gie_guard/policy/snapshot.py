"""The immutable result of loading a policy: what the engine compiles and the Guard reads.

A ``PolicySnapshot`` is built whole and then only ever replaced, never changed, so a
generation that reads it once sees one policy from start to end.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .schema import AutoScale, Policy, Presence, folded_text

__all__ = ["EffectiveConcept", "Merge", "PolicySnapshot", "content_hash", "expand_concepts"]


@dataclass(frozen=True)
class EffectiveConcept:
    """One text to inhibit, as the engine sees it.

    ``scale`` is the fixed scale, or None when the adapter chooses it (then ``auto`` holds
    the range and fallback). ``origin`` is the id of the policy concept it came from: its
    own id, or for an alias (id ``"<concept id>/<n>"``, n counting aliases from 1) the
    concept that lists the alias. ``declared_at`` is ``file:line`` of that concept.
    """

    id: str
    text: str
    category: str
    scale: float | None
    auto: AutoScale | None
    origin: str
    scale_source: Literal["policy", "auto"]
    declared_at: str | None = None
    anchors: tuple[str, ...] = ()
    presence: Presence = Presence(mode="off")

    @property
    def nominal_scale(self) -> float:
        """The scale used to rank concepts before the adapter runs: fixed scale or auto fallback."""
        if self.scale is not None:
            return self.scale
        assert self.auto is not None
        return self.auto.fallback

    @property
    def is_alias(self) -> bool:
        return self.id != self.origin


@dataclass(frozen=True)
class Merge:
    """Concepts folded into ``kept_id`` by deduplication.

    ``merged_ids`` are the concepts dropped (the kept one is not among them), in policy
    order. ``distance`` is the largest cosine distance between any two members of the group,
    kept one included (complete linkage: every pair is closer than the threshold).
    """

    merged_ids: tuple[str, ...]
    kept_id: str
    distance: float


@dataclass(frozen=True)
class PolicySnapshot:
    """A loaded policy: after includes, with disabled concepts left out, aliases expanded and
    near-duplicates merged. ``concepts`` keep policy order (included concepts first)."""

    policy: Policy
    concepts: tuple[EffectiveConcept, ...]
    merges: tuple[Merge, ...]
    content_hash: str
    source: str | None
    loaded_at: float
    files: tuple[str, ...] = ()
    # load-time warnings that do not stop the policy (e.g. an anchor that is a near-synonym of its concept)
    warnings: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.policy.name

    def concept(self, concept_id: str) -> EffectiveConcept:
        for concept in self.concepts:
            if concept.id == concept_id:
                return concept
        raise KeyError(concept_id)

    def __repr__(self) -> str:
        return (
            f"PolicySnapshot(name={self.name!r}, concepts={len(self.concepts)}, merges={len(self.merges)}, "
            f"source={self.source!r}, content_hash={self.content_hash[:12]!r})"
        )


def expand_concepts(policy: Policy, declared_at: dict[str, str] | None = None) -> tuple[EffectiveConcept, ...]:
    """Enabled concepts and their aliases, in policy order, before deduplication."""
    out = []
    for concept in policy.concepts:
        if not concept.enabled:
            continue
        auto = policy.resolved_auto(concept)
        scale = None if auto is not None else float(concept.scale)  # type: ignore[arg-type]
        anchors = _unique((*concept.preserve, *policy.preserve))
        presence = concept.presence or policy.presence
        texts = [(concept.id, concept.text)] + [(f"{concept.id}/{n}", a) for n, a in enumerate(concept.aliases, 1)]
        for concept_id, text in texts:
            out.append(EffectiveConcept(
                id=concept_id, text=text, category=concept.category, scale=scale, auto=auto,
                origin=concept.id, scale_source="auto" if auto is not None else "policy",
                declared_at=(declared_at or {}).get(concept.id), anchors=anchors, presence=presence,
            ))
    return tuple(out)


def _unique(texts: Iterable[str]) -> tuple[str, ...]:
    """Texts in order, dropping repeats that differ only in case and spacing."""
    seen: dict[str, str] = {}
    for text in texts:
        seen.setdefault(folded_text(text), text)
    return tuple(seen.values())


def content_hash(policy: Policy, concepts: Iterable[EffectiveConcept]) -> str:
    """sha256 of the canonical JSON of what the policy does: same content, same hash,
    whatever the formatting, key order, comments or include layout of the files."""
    canonical = {
        "version": policy.version,
        "name": policy.name,
        "description": policy.description,
        "inhibit_steps": list(policy.inhibit_steps),
        "dedup_threshold": policy.dedup_threshold,
        "on_missing_adapter": policy.on_missing_adapter,
        "preserve_by": policy.preserve_by,
        "controlnet": policy.controlnet,
        "concepts": [
            {
                "id": c.id, "text": c.text, "category": c.category, "scale": c.scale, "origin": c.origin,
                "auto": None if c.auto is None else {"fallback": c.auto.fallback, "min": c.auto.min, "max": c.auto.max},
                "anchors": list(c.anchors), "presence": c.presence.model_dump(),
            }
            for c in concepts
        ],
        # what verifiers do after generation is part of what the policy does
        "verify": {c.id: c.verify.model_dump() for c in policy.concepts if c.verify is not None},
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
