"""Semantic deduplication with the real all-MiniLM-L6-v2 embedder."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gie_guard.errors import PolicyError
from gie_guard.policy import (
    DEFAULT_DEDUP_THRESHOLD,
    Embedder,
    SentenceTransformerEmbedder,
    default_embedder,
    load_policy,
    pairwise_distances,
)


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


def _policy(*concepts, threshold=DEFAULT_DEDUP_THRESHOLD):
    return {
        "name": "t",
        "dedup_threshold": threshold,
        "concepts": [dict(zip(("id", "text", "scale"), c)) for c in concepts],
    }


def test_embedder_gives_unit_vectors_and_is_shared(embedder):
    assert isinstance(embedder, Embedder)
    vectors = embedder.encode(["nude", "car", "nude"])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert np.allclose(vectors[0], vectors[2])
    assert default_embedder() is embedder
    other = SentenceTransformerEmbedder()
    assert np.allclose(other.encode(["car"]), vectors[1:2], atol=1e-5)
    assert other._loaded() is embedder._loaded()  # one model per process


def test_embedder_loads_once_across_threads():
    fresh = SentenceTransformerEmbedder()
    results = []
    threads = [threading.Thread(target=lambda: results.append(fresh.encode(["cat"]))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(np.allclose(r, results[0]) for r in results)


def test_default_threshold_separates_synonyms_from_neighbours(embedder):
    words = ["nude", "naked", "nudity", "cat", "kitten", "dog", "car", "truck"]
    d = pairwise_distances(words, embedder)
    at = {w: i for i, w in enumerate(words)}
    for a, b in [("nude", "naked"), ("nude", "nudity"), ("naked", "nudity"), ("cat", "kitten")]:
        assert d[at[a], at[b]] < DEFAULT_DEDUP_THRESHOLD, (a, b)
    for a, b in [("cat", "dog"), ("car", "truck"), ("kitten", "dog")]:
        assert d[at[a], at[b]] >= DEFAULT_DEDUP_THRESHOLD, (a, b)


def test_nude_naked_nudity_merge_and_cat_dog_stay(embedder):
    snapshot = load_policy(_policy(("nude", "nude", 2.0), ("naked", "naked", 3.0), ("cat", "cat", 1.0),
                                   ("nudity", "nudity", 3.0), ("dog", "dog", 1.0)), embedder=embedder)
    assert [c.id for c in snapshot.concepts] == ["naked", "cat", "dog"]
    (merge,) = snapshot.merges
    # The highest scale wins; of equal scales the first in policy order.
    assert merge.kept_id == "naked" and merge.merged_ids == ("nude", "nudity")
    assert 0.25 < merge.distance < DEFAULT_DEDUP_THRESHOLD  # largest pair: naked/nudity


def test_auto_scale_counts_as_its_fallback(embedder):
    policy = _policy(("car", "car", 4.0), ("automobile", "automobile", "auto"))
    assert load_policy(policy, embedder=embedder).merges[0].kept_id == "automobile"  # fallback 5 > 4
    policy["auto_scale"] = {"fallback": 2.0}
    assert load_policy(policy, embedder=embedder).merges[0].kept_id == "car"


def test_complete_linkage_does_not_chain(embedder):
    # gun~weapon (0.21) and weapon~sword (0.27) are close, gun~sword (0.55) is not:
    # single linkage would fold all three into one inhibitor.
    snapshot = load_policy(_policy(("gun", "gun", 2.0), ("weapon", "weapon", 1.0), ("sword", "sword", 1.0)),
                           embedder=embedder)
    assert [c.id for c in snapshot.concepts] == ["gun", "sword"]
    assert [(m.kept_id, m.merged_ids) for m in snapshot.merges] == [("gun", ("weapon",))]


def test_aliases_are_deduplicated_like_concepts(embedder):
    snapshot = load_policy({"name": "t", "concepts": [
        {"id": "airplane", "text": "airplane", "aliases": ["aircraft", "aeroplane", "helicopter"], "scale": 3},
    ]}, embedder=embedder)
    assert [c.text for c in snapshot.concepts] == ["airplane", "helicopter"]
    assert snapshot.merges[0].merged_ids == ("airplane/1", "airplane/2")


def test_threshold_zero_turns_merging_off_without_an_embedder():
    snapshot = load_policy(_policy(("a", "nude", 1.0), ("b", "nude", 1.0), threshold=0))
    assert len(snapshot.concepts) == 2 and snapshot.merges == ()


def test_higher_threshold_merges_more(embedder):
    policy = _policy(("cat", "cat", 1.0), ("dog", "dog", 1.0))
    assert load_policy(policy, embedder=embedder).merges == ()
    policy["dedup_threshold"] = 0.4
    assert load_policy(policy, embedder=embedder).merges[0].merged_ids == ("dog",)


def test_any_object_with_encode_is_an_embedder():
    class Fixed:
        """Texts on a circle at the angle given in the text, for exact distances."""

        def encode(self, texts):
            angles = np.radians([float(t) for t in texts])
            return np.stack([np.cos(angles), np.sin(angles)], axis=1)

    # 0~20 and 20~40 are within 1 - cos(25 deg) = 0.094, 0~40 is not.
    snapshot = load_policy(_policy(("a", "0", 1.0), ("b", "20", 1.0), ("c", "40", 1.0), ("d", "180", 1.0),
                                   threshold=0.094), embedder=Fixed())
    assert [(m.kept_id, m.merged_ids) for m in snapshot.merges] == [("a", ("b",))]
    assert snapshot.merges[0].distance == pytest.approx(1 - np.cos(np.radians(20)), abs=1e-4)


def test_embedder_failure_is_a_policy_error(tmp_path):
    missing = SentenceTransformerEmbedder(tmp_path / "no-model-here")
    with pytest.raises(PolicyError, match="set dedup_threshold: 0"):
        load_policy(_policy(("a", "car", 1.0), ("b", "boat", 1.0)), embedder=missing)
