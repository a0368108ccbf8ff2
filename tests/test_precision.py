"""Precision: preservation anchors (`preserve:`) and presence gating (`presence:`), from the
policy file to the engine's maths."""

import math
import pathlib

import numpy as np
import pytest
import torch

from gie_guard import Guard, PolicyError
from gie_guard.engine.attention import centre_off, inhibitor, project_off
from gie_guard.engine.inhibition import anchor_effects
from gie_guard.policy import load_policy

CONCEPT = {"id": "beach", "text": "beach", "scale": 8.0}


def policy(**extra):
    concept = {**CONCEPT, **extra.pop("concept", {})}
    return {"name": "precise", "inhibit_steps": [0.0, 1.0], "dedup_threshold": 0, "concepts": [concept], **extra}


def call(pipe, guard=None, *, seed=0, steps=3):
    args = dict(prompt="a photo of a beach at sunset", num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed), output_type="np")
    return (guard(pipe, **args) if guard is not None else pipe(**args)).images


# -- the maths ---------------------------------------------------------------------------
def test_competing_anchors_take_their_softmax_share_and_add_nothing():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 4)  # (B, heads, pixels, d)
    keys, values = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)  # the concept's 3 slots
    anchor_keys = torch.randn(1, 2, 2, 4)
    w = torch.tensor([0.0, 2.0, 2.0])
    scale = 1 / math.sqrt(4)
    got = inhibitor(q, [(keys, values, w, anchor_keys)], scale=scale)
    # literal: one softmax over the concept's and the anchors' slots, anchors carrying zero values
    probs = torch.softmax(q @ torch.cat([keys, anchor_keys], 2).transpose(-1, -2) * scale, dim=-1)
    expected = probs[..., :3] @ (values * w[:, None])
    assert torch.allclose(got, expected, atol=1e-6)
    without = inhibitor(q, [(keys, values, w)], scale=scale)
    assert not torch.allclose(got, without, atol=1e-3)
    # no anchors (an empty anchor tensor) is bit-identical to the engine without anchors
    empty = inhibitor(q, [(keys, values, w, anchor_keys[:, :, :0])], scale=scale)
    assert torch.equal(empty, without)


def test_projection_removes_the_anchors_span_and_keeps_the_rest():
    torch.manual_seed(1)
    values = torch.randn(2, 3, 8)  # (heads, concept slots, d)
    basis = torch.randn(2, 2, 8)  # (heads, anchor slots, d)
    projected = project_off(values, basis)
    assert projected.abs().sum() > 0
    # nothing left along any anchor direction, and projecting twice changes nothing
    assert (projected @ basis.transpose(-1, -2)).abs().max() < 1e-4
    assert torch.allclose(project_off(projected, basis), projected, atol=1e-5)
    orthogonal = values - project_off(values, basis)
    assert torch.allclose(orthogonal + projected, values, atol=1e-6)


def test_centring_takes_out_the_anchors_mean_value_and_keeps_the_difference():
    torch.manual_seed(2)
    values = torch.randn(2, 3, 8)  # (heads, concept slots, d)
    anchors = torch.randn(2, 4, 8)  # (heads, anchor slots, d)
    centred = centre_off(values, anchors)
    assert torch.allclose(centred, values - anchors.mean(dim=1, keepdim=True), atol=1e-6)
    # an anchor whose values are the concept's own leaves nothing to inhibit; no anchors change nothing
    same = values[:, :1].expand(2, 4, 8)
    assert centre_off(values[:, :1], same).abs().max() < 1e-6
    assert centre_off(values, anchors[:, :0]) is values


def test_centroid_anchors_change_values_only_and_only_of_anchored_concepts(sd_pipe):
    two = {"name": "precise", "inhibit_steps": [0.0, 1.0], "dedup_threshold": 0, "preserve_by": "centroid",
           "concepts": [{**CONCEPT, "preserve": ["sand", "ocean"]}, {"id": "dog", "text": "dog", "scale": 2.0}]}
    plan = Guard(policy=two).plan_for(sd_pipe)
    assert plan.preserve == "centroid" and [len(a) for a in plan.concept_anchors] == [2, 0]
    torch.manual_seed(3)
    values = [torch.randn(2, 77, 8), torch.randn(2, 77, 8)]
    anchor_keys, anchor_values = [torch.randn(2, 1, 8), torch.randn(2, 2, 8)], [torch.randn(2, 1, 8), torch.randn(2, 2, 8)]
    competing, spared = anchor_effects(plan, values, anchor_keys, anchor_values)
    assert competing == [None, None]  # the anchors do not join the concept's softmax
    mine = torch.cat([anchor_values[a] for a in plan.concept_anchors[0]], dim=1)
    assert torch.allclose(spared[0], values[0] - mine.mean(dim=1, keepdim=True), atol=1e-6)
    assert spared[1] is values[1]


# -- policy files ----------------------------------------------------------------------
def test_anchors_are_read_deduplicated_inherited_by_aliases_and_hashed():
    snap = load_policy(policy(preserve=["ocean", "Sand"],
                              concept={"aliases": ["seaside"], "preserve": ["sand", "palm tree", "OCEAN"]}))
    beach, alias = snap.concepts
    assert beach.anchors == ("sand", "palm tree", "OCEAN") and alias.anchors == beach.anchors
    plain = load_policy(policy(concept={"aliases": ["seaside"]}))
    assert plain.concepts[0].anchors == ()
    assert snap.content_hash != plain.content_hash
    assert load_policy(policy(concept={"aliases": ["seaside"], "preserve": []})).content_hash == plain.content_hash
    by_projection = load_policy(policy(preserve_by="project", concept={"preserve": ["sand"]}))
    assert by_projection.content_hash != load_policy(policy(concept={"preserve": ["sand"]})).content_hash


@pytest.mark.parametrize("doc, where, words", [
    (policy(concept={"preserve": ["sand", "  Beach "]}), "concepts[0].preserve[1]", "is the concept itself"),
    (policy(concept={"aliases": ["seaside"], "preserve": ["seaside"]}), "concepts[0].preserve[0]", "is the concept itself"),
    (policy(preserve=["beach"]), "preserve[0]", "erased by concepts[0]"),
    (policy(concept={"presence": {"mode": "gate"}}), "concepts[0].presence", "needs a threshold"),
    (policy(presence={"mode": "scale", "threshold": 0}), "presence.threshold", "must be > 0"),
    (policy(preserve_by="nearby"), "preserve_by", "compete"),
])
def test_contradictory_precision_settings_are_refused_with_their_place(tmp_path, doc, where, words):
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert str(path) in message and where in message and words in message, message


# -- guarded calls ---------------------------------------------------------------------
def test_empty_anchors_and_gating_off_are_bit_identical_to_the_engine_without_them(sd_pipe):
    plain = call(sd_pipe, Guard(policy=policy()))
    explicit = call(sd_pipe, Guard(policy=policy(preserve=[], presence={"mode": "off"}, concept={"preserve": []})))
    assert np.array_equal(plain, explicit)
    assert np.abs(plain - call(sd_pipe)).max() > 1e-3  # the guard does change this image


def test_each_mechanism_runs_from_the_policy_and_changes_the_image(sd_pipe):
    plain = call(sd_pipe, Guard(policy=policy()))
    images = {}
    for mechanism in ("compete", "project", "both", "centroid"):
        guard = Guard(policy=policy(preserve_by=mechanism, concept={"preserve": ["sunset", "sand"]}))
        images[mechanism] = call(sd_pipe, guard)
        assert guard.plan_for(sd_pipe).preserve == mechanism
        assert np.abs(images[mechanism] - plain).max() > 1e-4, mechanism
    assert np.abs(images["compete"] - images["project"]).max() > 1e-4
    assert np.abs(images["centroid"] - images["project"]).max() > 1e-4
    # Guard(preserve=...) overrides the policy's mechanism
    override = Guard(policy=policy(preserve_by="compete", concept={"preserve": ["sunset", "sand"]}), preserve="project")
    assert np.array_equal(call(sd_pipe, override), images["project"])


def test_anchors_follow_a_hot_reload(sd_pipe, tmp_path: pathlib.Path):
    import yaml

    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy()))
    guard = Guard(policy=str(path))
    before = call(sd_pipe, guard)
    first_hash = guard.snapshot.content_hash
    path.write_text(yaml.safe_dump(policy(concept={"preserve": ["sunset"]})))
    assert guard.reload()
    assert guard.snapshot.content_hash != first_hash
    assert guard.snapshot.concepts[0].anchors == ("sunset",)
    after = call(sd_pipe, guard)
    assert np.abs(after - before).max() > 1e-4
    assert np.array_equal(after, call(sd_pipe, Guard(policy=policy(concept={"preserve": ["sunset"]}))))


def test_a_closed_gate_spares_the_image_and_an_open_gate_inhibits_it(sd_pipe):
    unguarded = call(sd_pipe)
    inhibited = call(sd_pipe, Guard(policy=policy()))
    # presence is a share of attention (<= 1): threshold 1 never opens, a tiny one always does
    closed = Guard(policy=policy(presence={"mode": "gate", "threshold": 1.0}))
    spared = call(sd_pipe, closed)
    concept = closed.last_report.concepts[0]
    assert concept.gate == (0.0,) and 0 < concept.presence[0] < 1
    assert np.abs(spared - unguarded).max() < 1e-5
    opened = Guard(policy=policy(concept={"presence": {"mode": "gate", "threshold": 1e-6}}))
    assert np.array_equal(call(sd_pipe, opened), inhibited)
    assert opened.last_report.concepts[0].gate == (1.0,)
    # scale mode: the factor is presence / threshold, capped at 1
    halfway = Guard(policy=policy(presence={"mode": "scale", "threshold": 1.0}))
    call(sd_pipe, halfway)
    scaled = halfway.last_report.concepts[0]
    assert scaled.gate[0] == pytest.approx(scaled.presence[0], rel=1e-5)


def test_the_default_mechanism_is_the_one_measured_best_for_the_family(sd_pipe):
    from gie_guard.testing import tiny_sd3_pipeline

    anchored = policy(concept={"preserve": ["sunset"]})
    assert load_policy(anchored).policy.preserve_by == "auto"
    assert Guard(policy=anchored).plan_for(sd_pipe).preserve == "compete"  # cross-attention
    assert Guard(policy=anchored).plan_for(tiny_sd3_pipeline()).preserve == "project"  # joint attention
    assert Guard(policy=anchored, preserve="compete").plan_for(tiny_sd3_pipeline()).preserve == "compete"


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_presence_is_measured_without_the_competing_anchors(family, sd_pipe):
    # compete anchors shrink every map by their share; a presence threshold (or an adapter's
    # features) calibrated without anchors must read the same presence with them
    from gie_guard.testing import tiny_sd3_pipeline

    pipe, size = (sd_pipe, {}) if family == "sd" else (tiny_sd3_pipeline(), {"height": 32, "width": 32})
    gate = {"mode": "scale", "threshold": 1.0}
    measured = {}
    for anchors in ([], ["sunset", "sand"]):
        guard = Guard(policy=policy(presence=gate, preserve_by="compete", concept={"preserve": anchors}))
        guard(pipe, prompt="a photo of a beach at sunset", num_inference_steps=2, output_type="np",
              generator=torch.Generator().manual_seed(0), **size)
        measured[len(anchors)] = guard.last_report.concepts[0].presence[0]
    assert measured[2] == pytest.approx(measured[0], rel=1e-5) and 0 < measured[0] < 1


# -- suggested anchors -----------------------------------------------------------------
def test_suggested_anchors_are_near_neighbours_the_policy_does_not_erase(tmp_path):
    from gie_guard.policy.anchors import suggest_anchors

    snap = load_policy({"name": "shapes", "concepts": [
        {"id": "triangle", "text": "triangle", "scale": 2.0, "preserve": ["circle"]},
        {"id": "star", "text": "star", "scale": 2.0},
    ]})
    vocabulary = ["star", "circle", "square", "pyramid", "triangles", "banana", "Star "]
    found = suggest_anchors(snap, vocabulary, per_concept=3)
    picks = found["triangle"]
    texts = [p.text for p in picks]
    # erased texts (star), the concept's own anchors (circle) and synonyms closer than the
    # dedup threshold ("triangles") are never suggested
    assert "star" not in texts and "Star " not in texts and "circle" not in texts and "triangles" not in texts
    assert texts and [p.distance for p in picks] == sorted(p.distance for p in picks)
    assert all(p.distance >= snap.policy.dedup_threshold for p in picks)
    assert "banana" not in texts[:2]  # a shape is nearer to a triangle than a banana is


def test_explain_suggests_anchors_from_the_shipped_and_the_operators_vocabulary(tmp_path, capsys):
    import yaml

    from gie_guard.cli import main

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "preserve_by": "project", "concepts": [
        {"id": "beach", "text": "beach", "scale": 2.0, "preserve": ["ocean"], "presence": {"mode": "gate", "threshold": 0.2}},
    ]}))
    extra = tmp_path / "words.txt"
    extra.write_text("# mine\nsandy seashore coast with waves\n\n")
    assert main(["policy", "explain", str(path), "--suggest-anchors", "--vocabulary", str(extra), "--top", "40"]) == 0
    out = capsys.readouterr().out
    assert "preservation anchors (preserve_by: project):" in out and "beach: 'ocean'" in out
    assert "beach: gate at presence >= 0.2" in out
    suggested = out.split("suggested anchors")[1]
    assert "sandy seashore coast with waves (" in suggested and "sunset (" in suggested
    assert main(["policy", "explain", str(path), "--suggest-anchors", "--vocabulary", str(tmp_path / "missing.txt")]) == 1
    assert f"{tmp_path / 'missing.txt'}: no such file" in capsys.readouterr().err


def test_guard_options_are_checked_when_the_guard_is_built():
    from gie_guard import ConfigurationError

    for options in ({"preserve": "nearby"}, {"controlnet": "maybe"}, {"text_states": "frozen"}, {"carry": "some"}):
        with pytest.raises(ConfigurationError, match=next(iter(options))):
            Guard(policy=policy(), **options)


def test_presence_mode_off_may_be_written_unquoted(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: p\nconcepts:\n  - {id: beach, text: beach, scale: 2.0, presence: {mode: off}}\n"
                    "presence: {mode: off}\n")
    snap = load_policy(path)
    assert snap.policy.presence.mode == "off" and snap.concepts[0].presence.mode == "off"


def test_an_anchor_that_is_a_near_synonym_of_its_concept_is_warned_about_at_load(tmp_path, caplog, capsys):
    import logging

    import yaml

    from gie_guard.cli import main

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "concepts": [
        # "naked" is 0.165 from "nude" in MiniLM (dedup_threshold 0.30 would merge them); "square" is far from "circle"
        {"id": "nudity", "text": "nude", "scale": 2.0, "preserve": ["naked", "beach"]},
        {"id": "circle", "text": "circle", "scale": 2.0, "preserve": ["square"]},
    ]}, sort_keys=False))
    with caplog.at_level(logging.WARNING, logger="gie_guard.policy"):
        snap = load_policy(str(path))
    (warning,) = snap.warnings
    assert f"{path}:3" in warning and "'nudity'" in warning and "'naked'" in warning and "dedup_threshold 0.3" in warning
    assert any("'naked'" in r.getMessage() for r in caplog.records)
    assert main(["policy", "explain", str(path)]) == 0
    assert "anchor 'naked' is within cosine distance 0.165" in capsys.readouterr().err
    # dedup off: nothing is called a synonym; no anchors: nothing is embedded for the check
    quiet = {"name": "p", "dedup_threshold": 0, "concepts": [{"id": "nudity", "text": "nude", "scale": 2.0, "preserve": ["naked"]}]}
    assert load_policy(quiet).warnings == ()
    assert load_policy({"name": "p", "concepts": [{"id": "c", "text": "circle", "scale": 1.0}]}).warnings == ()
