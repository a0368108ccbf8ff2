"""Scale: deduplication keeps its exact semantics but not its cubic cost, and the
documented caps (gie_guard/limits.py) refuse oversized policies fast and clearly."""

from __future__ import annotations

import time

import numpy as np
import pytest
import yaml

from gie_guard.errors import PolicyError
from gie_guard.limits import MAX_CONCEPT_TEXTS, MAX_CONCEPTS, MAX_SCALE
from gie_guard.policy import PolicyStore, deduplicate, load_policy, read_policy
from gie_guard.policy.schema import AutoScale
from gie_guard.policy.snapshot import EffectiveConcept, Merge


# -- the implementation before this change, kept as the reference ------------------------


def _ref_complete_linkage(distances, threshold):
    close = distances < threshold
    np.fill_diagonal(close, False)
    groups = []
    for component in _ref_components(close):
        if len(component) > 1:
            groups.extend(_ref_agglomerate(distances[np.ix_(component, component)], threshold, component))
    return [g for g in groups if len(g) > 1]


def _ref_components(adjacent):
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


def _ref_agglomerate(d, threshold, labels):
    d = np.round(d.astype(np.float64), 6)
    np.fill_diagonal(d, np.inf)
    members = [[label] for label in labels]
    alive = list(range(len(labels)))
    while len(alive) > 1:
        sub = d[np.ix_(alive, alive)]
        flat = int(np.argmin(sub))
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


def _ref_deduplicate(concepts, threshold, distances):
    groups = _ref_complete_linkage(distances, threshold)
    dropped, merges = set(), []
    for group in groups:
        kept = max(group, key=lambda i: (concepts[i].nominal_scale, -i))
        others = [i for i in group if i != kept]
        dropped.update(others)
        spread = float(distances[np.ix_(group, group)].max())
        merges.append((kept, Merge(tuple(concepts[i].id for i in others), concepts[kept].id, round(spread, 4))))
    merges.sort(key=lambda m: m[0])
    return tuple(c for i, c in enumerate(concepts) if i not in dropped), tuple(m for _, m in merges)


# -- random embeddings with ties -----------------------------------------------------------


class TableEmbedder:
    """Texts ``t<i>`` to row i of a fixed table."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table

    def encode(self, texts):
        return self.table[[int(t[1:]) for t in texts]]


def _embeddings(rng, n: int, dim: int = 16) -> np.ndarray:
    """Families of near-duplicates; exact duplicates (ties) and shared directions."""
    families = max(1, int(rng.integers(1, max(2, n // 4))))
    centers = rng.normal(size=(families, dim))
    which = rng.integers(0, families, size=n)
    noise = rng.choice([0.0, 0.0, 0.05, 0.2, 0.5], size=(n, 1))  # 0: exact copies, all pairs tie
    vectors = centers[which] + noise * rng.normal(size=(n, dim))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _concepts(rng, n: int):
    out = []
    for i in range(n):
        choice = int(rng.integers(0, 4))
        scale = None if choice == 3 else float(choice + 1)  # few values: many scale ties
        auto = AutoScale(fallback=2.0) if scale is None else None
        out.append(EffectiveConcept(id=f"c{i}", text=f"t{i}", category="custom", scale=scale, auto=auto,
                                    origin=f"c{i}", scale_source="auto" if auto else "policy"))
    return out


@pytest.mark.parametrize("small", [96, 2], ids=["default", "nearest-neighbour-path-only"])
@pytest.mark.parametrize("seed", range(12))
def test_same_result_as_the_reference_implementation(seed, small, monkeypatch):
    # components up to _SMALL texts take a short path; 2 sends every one through the other
    monkeypatch.setattr("gie_guard.policy.dedup._SMALL", small, raising=False)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(150, 400))
    table = _embeddings(rng, n)
    concepts = _concepts(rng, n)
    distances = np.clip(1.0 - table @ table.T, 0.0, 2.0)
    for threshold in (0.02, 0.1, 0.3, 0.6):
        expected = _ref_deduplicate(concepts, threshold, distances)
        got = deduplicate(concepts, threshold=threshold, embedder=TableEmbedder(table), cache_dir=False)
        assert got == expected, (seed, threshold)
        # the row-block path used above 4,096 texts groups the same way
        from gie_guard.policy.dedup import _linkage

        blocked, _ = _linkage(table, threshold, dense_limit=0, block=37)
        assert sorted(blocked) == sorted(_ref_complete_linkage(distances, threshold)), (seed, threshold)


def test_ties_resolve_in_policy_order():
    # four identical vectors: every pair ties at distance 0; one group, the first kept
    table = np.tile([[1.0, 0.0]], (4, 1))
    concepts = _concepts(np.random.default_rng(0), 4)
    concepts = [EffectiveConcept(**{**c.__dict__, "scale": 1.0, "auto": None, "scale_source": "policy"}) for c in concepts]
    kept, merges = deduplicate(concepts, threshold=0.3, embedder=TableEmbedder(table), cache_dir=False)
    assert [c.id for c in kept] == ["c0"] and merges == (Merge(("c1", "c2", "c3"), "c0", 0.0),)


def _families(n: int, seed: int = 0, dim: int = 384, families: int = 2) -> np.ndarray:
    """The worst case for complete linkage: a few huge families whose members are all
    within or near the threshold of each other (components of n / families texts)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(families, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    sigma = rng.uniform(0.4, 0.7, size=(n, 1))
    vectors = centers[rng.integers(0, families, size=n)] + sigma * rng.normal(size=(n, dim)) / np.sqrt(dim)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_two_thousand_texts_in_huge_families_deduplicate_in_seconds():
    # The previous implementation took 7-16 s here (cubic in the component size).
    n = MAX_CONCEPT_TEXTS
    table = _families(n)
    concepts = _concepts(np.random.default_rng(1), n)
    kept, merges = deduplicate(concepts, threshold=0.3, embedder=TableEmbedder(table), cache_dir=False)
    assert merges and len(kept) < n  # (its time: benchmarks/compile_policy.py)


# -- caps ------------------------------------------------------------------------------


def _big_policy(n: int, *, aliases: int = 0, threshold: float | None = None) -> str:
    doc = {"name": "big", "concepts": [
        {"id": f"c{i}", "text": f"concept {i}", "scale": 1.0, **({"aliases": [f"alias {i}.{k}" for k in range(aliases)]}
                                                                  if aliases else {})}
        for i in range(n)]}
    if threshold is not None:
        doc["dedup_threshold"] = threshold
    return yaml.safe_dump(doc)


def test_ten_thousand_concepts_are_refused_fast(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(_big_policy(10_000), encoding="utf-8")
    assert path.stat().st_size < 1024 * 1024  # under the size limit: the count refuses it
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    error = caught.value
    assert error.place == "concepts" and error.line == 1
    assert "10,000 concept texts" in error.problem and f"at most {MAX_CONCEPT_TEXTS:,} (MAX_CONCEPT_TEXTS)" in error.problem
    # the count is taken before anything is built or validated (loading would embed 10,000
    # texts): about 1 s on the 2-core development machine, not asserted here (a busy machine)


def test_aliases_count_and_disabled_concepts_do_not(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text(_big_policy(700, aliases=2), encoding="utf-8")  # 2,100 texts
    with pytest.raises(PolicyError, match="2,100 concept texts"):
        read_policy(path)
    doc = yaml.safe_load(_big_policy(2_100, threshold=0.3))
    for concept in doc["concepts"][:200]:
        concept["enabled"] = False
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    assert len(read_policy(path).policy.concepts) == 2_100  # 1,900 enabled: allowed


def test_the_total_after_includes_is_capped(tmp_path):
    (tmp_path / "a.yaml").write_text(_big_policy(1_500).replace("name: big", "name: a"), encoding="utf-8")
    doc = yaml.safe_load(_big_policy(1_000))
    for concept in doc["concepts"]:
        concept["id"] = "b" + concept["id"]
    doc["include"] = ["a.yaml"]
    (tmp_path / "top.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(PolicyError, match="2,500 concept texts .*after includes") as caught:
        read_policy(tmp_path / "top.yaml")
    assert caught.value.place == "concepts"


def test_concepts_after_deduplication_are_capped(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text(_big_policy(1_200, threshold=0), encoding="utf-8")
    with pytest.raises(PolicyError, match=f"1,200 concepts with deduplication off.*at most {MAX_CONCEPTS:,}"):
        read_policy(path)
    # with deduplication on, what counts is what is left after merging
    path.write_text(_big_policy(1_200, threshold=0.3), encoding="utf-8")
    far_apart = TableEmbedder(np.eye(1_200))
    texts = {f"concept {i}": i for i in range(1_200)}

    class ByText:
        def encode(self, batch):
            return far_apart.table[[texts[t] for t in batch]]

    with pytest.raises(PolicyError, match=f"1,200 concepts after deduplication .*at most {MAX_CONCEPTS:,} "
                                          r"\(MAX_CONCEPTS\)") as caught:
        PolicyStore(path, embedder=ByText(), cache_dir=False)
    assert caught.value.file == str(path) and caught.value.place == "concepts"
    merged = np.repeat(np.eye(600), 2, axis=0)  # pairs of identical texts: 600 left

    class Pairs:
        def encode(self, batch):
            return merged[[texts[t] for t in batch]]

    assert len(load_policy(path, embedder=Pairs(), cache_dir=False).concepts) == 600


@pytest.mark.parametrize("scale", [
    "1000", "100.5", "{auto: true, max: 1000}", "{auto: true, fallback: 200, max: 300}", "{auto: true, min: 101}",
])
def test_scales_are_bounded_by_max_scale(tmp_path, scale):
    path = tmp_path / "p.yaml"
    path.write_text(f"name: x\nconcepts:\n  - id: a\n    text: t\n    scale: {scale}\n", encoding="utf-8")
    with pytest.raises(PolicyError, match=f"must be <= {MAX_SCALE} \\(MAX_SCALE") as caught:
        read_policy(path)
    assert caught.value.line == 5 and caught.value.place.startswith("concepts[0].scale")


def test_policy_auto_scale_is_bounded_and_max_scale_itself_is_fine(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nauto_scale: {max: 500}\n", encoding="utf-8")
    with pytest.raises(PolicyError, match="MAX_SCALE") as caught:
        read_policy(path)
    assert caught.value.place == "auto_scale.max"
    path.write_text(f"name: x\nauto_scale: {{max: {MAX_SCALE}}}\nconcepts: [{{id: a, text: t, scale: {MAX_SCALE}}}]\n")
    assert read_policy(path).policy.concepts[0].scale == MAX_SCALE
