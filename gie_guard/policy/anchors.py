"""Suggested preservation anchors: each concept's nearest neighbours, in the embedder's space,
from a vocabulary of things the policy does not erase (``gie-guard policy explain
--suggest-anchors``).

Erasing a concept tends to take its closest siblings with it (docs/precision.md); the
nearest vocabulary entries are the candidates an operator copies into ``preserve:``.
Entries closer than the policy's ``dedup_threshold`` are left out: the policy would merge
them with the concept as synonyms, and preserving a synonym cancels the erasure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigurationError
from .dedup import Embedder, _unit_rows, default_embedder
from .embedcache import CacheDir
from .files import FileProblem, read_regular_file
from .loader import shipped_policy_dir
from .schema import folded_text
from .snapshot import EffectiveConcept, PolicySnapshot

__all__ = ["Suggestion", "read_vocabulary", "shipped_vocabulary", "suggest_anchors", "synonym_anchor_warnings"]

MAX_VOCABULARY = 100_000  # entries; a bigger file is refused (embedding it would take minutes)
MAX_VOCABULARY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Suggestion:
    """One candidate anchor for ``concept_id``: ``text`` at cosine ``distance``."""

    concept_id: str
    text: str
    distance: float


def shipped_vocabulary() -> Path:
    return shipped_policy_dir() / "anchor-vocabulary.txt"


def read_vocabulary(path: str | os.PathLike[str]) -> list[str]:
    """Entries of a vocabulary file: one per line, ``#`` comments and blank lines skipped."""
    try:
        text = read_regular_file(Path(path), limit=MAX_VOCABULARY_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except FileProblem as exc:
        raise ConfigurationError(f"{path}: {exc}") from exc
    entries = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    entries = [e for e in entries if e]
    if len(entries) > MAX_VOCABULARY:
        raise ConfigurationError(f"{path}: {len(entries):,} entries; a vocabulary may have at most {MAX_VOCABULARY:,}")
    return entries


def suggest_anchors(
    snapshot: PolicySnapshot,
    vocabulary: Iterable[str],
    *,
    per_concept: int = 5,
    embedder: Embedder | None = None,
) -> dict[str, list[Suggestion]]:
    """Per concept of ``snapshot`` (after deduplication), its ``per_concept`` nearest vocabulary
    entries that the policy neither erases nor already preserves for it, nearest first."""
    if per_concept < 1:
        raise ConfigurationError(f"the number of suggestions per concept must be at least 1, got {per_concept}")
    erased = {folded_text(t) for c in snapshot.policy.concepts if c.enabled for t in (c.text, *c.aliases)}
    candidates = list(dict.fromkeys(e for e in vocabulary if folded_text(e) not in erased))
    concepts = snapshot.concepts
    if not concepts or not candidates:
        return {c.id: [] for c in concepts}
    rows = _unit_rows([c.text for c in concepts] + candidates, embedder or default_embedder(), None)
    distances = np.clip(1.0 - rows[: len(concepts)] @ rows[len(concepts):].T, 0.0, 2.0)  # (concepts, entries)
    synonym_below = snapshot.policy.dedup_threshold
    found: dict[str, list[Suggestion]] = {}
    for i, concept in enumerate(concepts):
        kept = {folded_text(a) for a in concept.anchors}
        picks: list[Suggestion] = []
        for j in np.argsort(distances[i], kind="stable"):
            text, d = candidates[j], float(distances[i, j])
            if d < synonym_below or folded_text(text) in kept:
                continue
            picks.append(Suggestion(concept.id, text, round(d, 4)))
            if len(picks) == per_concept:
                break
        found[concept.id] = picks
    return found


def vocabulary_of(files: Sequence[str | os.PathLike[str]], *, shipped: bool = True) -> list[str]:
    """The shipped vocabulary (unless ``shipped`` is False) followed by each file's entries."""
    entries = read_vocabulary(shipped_vocabulary()) if shipped else []
    for path in files:
        entries += read_vocabulary(path)
    return entries


def synonym_anchor_warnings(
    concepts: Sequence[EffectiveConcept],
    *,
    threshold: float,
    embedder: Embedder | None = None,
    cache_dir: CacheDir = None,
) -> tuple[str, ...]:
    """A warning per (concept, anchor) pair closer than ``threshold`` (the policy's
    ``dedup_threshold``, a cosine distance): the policy would merge the two texts as
    synonyms, and sparing a synonym of the erased concept can cancel its erasure (``project``
    takes the concept's own direction out of its inhibitor). Exact repeats are refused by the
    schema; this catches the near ones. Nothing to check when the threshold is 0 or no
    concept has anchors."""
    anchored = [c for c in concepts if c.anchors]
    if threshold <= 0 or not anchored:
        return ()
    anchors = list(dict.fromkeys(a for c in anchored for a in c.anchors))
    rows = _unit_rows([c.text for c in anchored] + anchors, embedder or default_embedder(), cache_dir)
    at = {a: len(anchored) + i for i, a in enumerate(anchors)}
    warnings = []
    for i, concept in enumerate(anchored):
        for anchor in concept.anchors:
            distance = float(np.clip(1.0 - rows[i] @ rows[at[anchor]], 0.0, 2.0))
            if distance < threshold:
                where = f"{concept.declared_at}: " if concept.declared_at else ""
                warnings.append(
                    f"{where}concept {concept.id!r}: anchor {anchor!r} is within cosine distance {distance:.3f} of "
                    f"{concept.text!r} (dedup_threshold {threshold:g}), a synonym the policy would merge; sparing it "
                    "can cancel the erasure: remove it from preserve: or check it with benchmarks/erasure.py --preserve"
                )
    return tuple(warnings)
