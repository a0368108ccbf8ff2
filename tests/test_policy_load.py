"""Loading valid policies: shipped names, includes, aliases, auto scales and content hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gie_guard.policy import (
    DEFAULT_DEDUP_THRESHOLD,
    AutoScale,
    Concept,
    Policy,
    PolicySnapshot,
    default_embedder,
    load_policy,
    read_policy,
    shipped_policy_dir,
    shipped_policy_names,
)

SHIPPED = ["artists", "nsfw", "objects", "shapes-demo", "violence"]


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


def _write(folder: Path, name: str, content: str) -> Path:
    path = folder / name
    path.write_text(content, encoding="utf-8")
    return path


def test_shipped_policies_are_found_in_the_checkout():
    assert shipped_policy_dir() == Path(__file__).resolve().parents[1] / "policies"
    assert shipped_policy_names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_policy_loads_by_name(name, embedder):
    snapshot = load_policy(name, embedder=embedder)
    assert isinstance(snapshot, PolicySnapshot)
    assert snapshot.policy.name == name
    assert snapshot.source == f"shipped:{name}"
    assert snapshot.policy.description
    assert snapshot.concepts and all(c.scale is not None for c in snapshot.concepts)
    assert snapshot.files == (str(shipped_policy_dir() / f"{name}.yaml"),)


def test_shipped_nsfw_covers_the_implicit_words():
    texts = {t for c in read_policy("nsfw").policy.concepts for t in (c.text, *c.aliases)}
    assert {"nude", "naked", "nudity", "topless", "sexual"} <= texts
    artists = {c.text for c in read_policy("artists").policy.concepts}
    assert {"Van Gogh", "Monet", "Hokusai"} <= artists


def test_snapshot_fields_and_defaults(tmp_path, embedder):
    path = _write(tmp_path, "p.yaml", "name: demo\nconcepts:\n  - {id: circle, text: circle, scale: 10}\n")
    snapshot = load_policy(path, embedder=embedder)
    policy = snapshot.policy
    assert (policy.version, policy.inhibit_steps, policy.dedup_threshold) == ("1", (0.0, 0.8), DEFAULT_DEDUP_THRESHOLD)
    assert policy.on_missing_adapter == "fallback"
    (concept,) = snapshot.concepts
    assert (concept.id, concept.text, concept.category, concept.scale, concept.auto) == ("circle", "circle", "custom",
                                                                                          10.0, None)
    assert (concept.origin, concept.scale_source, concept.declared_at) == ("circle", "policy", f"{path}:3")
    assert snapshot.source == str(path) and snapshot.merges == () and len(snapshot.content_hash) == 64
    assert "demo" in repr(snapshot)


def test_aliases_become_concepts_and_disabled_ones_vanish(embedder):
    snapshot = load_policy({
        "name": "x",
        "dedup_threshold": 0,
        "concepts": [
            {"id": "car", "text": "car", "aliases": ["bicycle", "boat"], "scale": 2},
            {"id": "off", "text": "tree", "enabled": False},
        ],
    }, embedder=embedder)
    assert [(c.id, c.text, c.origin, c.is_alias) for c in snapshot.concepts] == [
        ("car", "car", "car", False), ("car/1", "bicycle", "car", True), ("car/2", "boat", "car", True)]
    assert all(c.scale == 2.0 for c in snapshot.concepts)


def test_auto_scales_take_policy_defaults(embedder):
    snapshot = load_policy({
        "name": "x",
        "dedup_threshold": 0,
        "auto_scale": {"fallback": 4, "max": 8},
        "concepts": [
            {"id": "a", "text": "car", "scale": "auto"},
            {"id": "b", "text": "tree", "scale": {"auto": True, "max": 6}},
            {"id": "c", "text": "house"},
        ],
    }, embedder=embedder)
    a, b, c = snapshot.concepts
    assert a.scale is None and a.scale_source == "auto" and a.auto == AutoScale(fallback=4, min=0, max=8)
    assert b.auto == AutoScale(fallback=4, min=0, max=6) and b.nominal_scale == 4
    assert c.auto == a.auto  # no scale means auto


def test_content_hash_ignores_formatting(tmp_path, embedder):
    block = _write(tmp_path, "a.yaml", "# comment\nname: x\nconcepts:\n  - id: a\n    text: nude\n    scale: 3\n")
    flow = _write(tmp_path, "b.yaml", "concepts: [{scale: 3.0, text: 'nude', id: a}]\nname: x\nversion: '1'\n")
    changed = _write(tmp_path, "c.yaml", "name: x\nconcepts: [{id: a, text: nude, scale: 3.5}]\n")
    hashes = [load_policy(p, embedder=embedder).content_hash for p in (block, flow, changed)]
    assert hashes[0] == hashes[1] != hashes[2]
    as_dict = load_policy({"name": "x", "concepts": [{"id": "a", "text": "nude", "scale": 3}]}, embedder=embedder)
    assert as_dict.content_hash == hashes[0]


def test_policy_object_source(embedder):
    policy = Policy(name="obj", concepts=(Concept(id="a", text="car", scale=1.5),))
    snapshot = load_policy(policy, embedder=embedder)
    assert snapshot.source is None and snapshot.concepts[0].scale == 1.5 and snapshot.policy == policy
    assert "Concept(id='a', text='car'" in repr(policy)


def test_includes_come_first_and_can_be_overridden(tmp_path, embedder):
    (tmp_path / "base").mkdir()
    _write(tmp_path / "base", "common.yaml",
           "name: common\ninhibit_steps: [0.1, 0.2]\nauto_scale: {fallback: 2}\nconcepts:\n"
           "  - {id: car, text: car, scale: 1}\n  - {id: tree, text: tree}\n")
    top = _write(tmp_path, "top.yaml",
                 "name: top\ninclude: [base/common.yaml, shapes-demo]\nconcepts:\n"
                 "  - {id: boat, text: boat, scale: 2}\n  - {id: car, text: red car, scale: 4}\n")
    snapshot = load_policy(top, embedder=embedder)
    assert [(c.id, c.text) for c in snapshot.concepts] == [("car", "red car"), ("tree", "tree"),
                                                           ("circle", "circle"), ("boat", "boat")]
    # The including file's settings win; included concepts keep their own file's auto defaults.
    assert snapshot.policy.name == "top" and snapshot.policy.inhibit_steps == (0.0, 0.8)
    assert snapshot.concept("tree").auto == AutoScale(fallback=2, min=0, max=20)
    assert snapshot.concept("car").declared_at == f"{top}:5"
    assert snapshot.policy.include == ()
    assert set(snapshot.files) == {str(top), str(tmp_path / "base" / "common.yaml"),
                                   str(shipped_policy_dir() / "shapes-demo.yaml")}


def test_diamond_include_is_read_once(tmp_path, embedder):
    _write(tmp_path, "base.yaml", "name: base\nconcepts: [{id: car, text: car, scale: 1}]\n")
    _write(tmp_path, "left.yaml", "name: left\ninclude: [base.yaml]\nconcepts: []\n")
    _write(tmp_path, "right.yaml", "name: right\ninclude: [base.yaml]\nconcepts: [{id: boat, text: boat, scale: 1}]\n")
    top = _write(tmp_path, "top.yaml", "name: top\ninclude: [left.yaml, right.yaml]\nconcepts: []\n")
    snapshot = load_policy(top, embedder=embedder)
    assert [c.id for c in snapshot.concepts] == ["car", "boat"]


def test_the_example_in_the_docs_is_valid(tmp_path):
    docs = (Path(__file__).resolve().parents[1] / "docs" / "policies.md").read_text(encoding="utf-8")
    example = docs.split("```yaml\n", 1)[1].split("```", 1)[0]
    flat = read_policy(_write(tmp_path, "example.yaml", example))
    ids = [c.id for c in flat.policy.concepts]
    assert ids[0] == "nsfw-01" and "van-gogh" in ids  # the override keeps the included concept's place
    assert flat.policy.concepts[0].scale == AutoScale(fallback=3.0, min=0.0, max=4.0)
