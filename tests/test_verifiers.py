"""Verifiers: residual detections after generation, and what the policy does about them."""

import pathlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import gie_guard
from gie_guard import ConfigurationError, ContentBlockedError, Guard, GuardedCallError, PolicyError
from gie_guard.detectors.nudenet import NUDENET_LABELS, NudeNetDetector
from gie_guard.detectors.shapes import ShapesDetector
from gie_guard.policy import load_policy
from gie_guard.verifiers import StaticVerifier, Verifier, blur_image, default_verifiers, run_verifiers


def checkerboard(size=32, seed=0):
    rng = np.random.default_rng(seed)
    board = (np.indices((size, size)).sum(0) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([board, board[::-1], rng.integers(0, 256, (size, size), dtype=np.uint8)], -1))


def policy(action="record", labels=(), verifier="fake"):
    verify = {"verifier": verifier, "action": action, **({"labels": list(labels)} if labels else {})}
    return load_policy({"name": "p", "concepts": [{"id": "circle", "text": "circle", "scale": 1.0, "verify": verify}]})


def sharpness(image):
    a = np.asarray(image, dtype=float)
    return np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()


def test_blur_hides_detail():
    image = checkerboard()
    blurred = blur_image(image)
    assert blurred.size == image.size and blurred.mode == image.mode
    assert sharpness(blurred) < 0.2 * sharpness(image)


def test_record_keeps_the_images_and_reports_the_hit():
    images = [checkerboard(seed=0), checkerboard(seed=1)]
    output = SimpleNamespace(images=list(images))
    verifier = StaticVerifier(lambda i: {"circle"} if i == 1 else {"red"})
    out, found = run_verifiers(policy("record"), output, {"fake": verifier})
    assert out.images == images
    assert [(h.concept_id, h.images, h.action) for h in found.hits] == [("circle", (1,), "record")]
    assert found.outcome == "recorded" and found.checked == {"circle": 2}


def test_blur_replaces_only_the_affected_images_pil_and_numpy():
    images = [checkerboard(seed=0), checkerboard(seed=1)]
    verifier = StaticVerifier(lambda i: {"circle"} if i == 0 else set())
    out, found = run_verifiers(policy("blur"), SimpleNamespace(images=list(images)), {"fake": verifier})
    assert found.outcome == "blurred"
    assert sharpness(out.images[0]) < 0.2 * sharpness(images[0])
    assert out.images[1] is images[1]
    array = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    out, _ = run_verifiers(policy("blur"), SimpleNamespace(images=array.copy()), {"fake": verifier})
    assert out.images.shape == array.shape and out.images.dtype == array.dtype
    assert sharpness(out.images[0]) < 0.2 * sharpness(array[0])
    np.testing.assert_array_equal(out.images[1], array[1])
    # return_dict=False outputs are tuples (images, nsfw flags)
    out, _ = run_verifiers(policy("blur"), (list(images), None), {"fake": verifier})
    assert isinstance(out, tuple) and out[1] is None and sharpness(out[0][0]) < sharpness(images[0])


def test_block_is_the_strongest_action_and_labels_map_to_concepts():
    out, found = run_verifiers(policy("block", labels=["disc", "ring"]), SimpleNamespace(images=[checkerboard()]),
                               {"fake": StaticVerifier({"ring"})})
    assert found.action == "block" and found.outcome == "blocked"
    _, found = run_verifiers(policy("block", labels=["disc"]), SimpleNamespace(images=[checkerboard()]),
                             {"fake": StaticVerifier({"circle"})})
    assert found.hits == ()  # with labels given, the concept id itself is not a label


def test_no_verify_key_runs_nothing():
    snapshot = load_policy({"name": "p", "concepts": [{"id": "c", "text": "c", "scale": 1.0}]})
    verifier = StaticVerifier({"c"})
    output = SimpleNamespace(images=[checkerboard()])
    assert run_verifiers(snapshot, output, {"fake": verifier}) == (output, None)
    assert verifier.calls == 0


def test_misconfigured_verifiers_fail_closed():
    with pytest.raises(PolicyError, match=r"concept circle\.verify.*unknown verifier 'nope'"):
        Guard(policy={"name": "p", "concepts": [{"id": "circle", "text": "circle", "scale": 1.0,
                                                  "verify": {"verifier": "nope"}}]})
    with pytest.raises(PolicyError, match="action"):
        load_policy({"name": "p", "concepts": [{"id": "c", "text": "c", "verify": {"verifier": "x", "action": "shrug"}}]})
    with pytest.raises(GuardedCallError, match="answered for 0 images, not 1"):
        run_verifiers(policy(), SimpleNamespace(images=[checkerboard()]), {"fake": lambda images: []})
    with pytest.raises(GuardedCallError, match="has none of that name"):
        run_verifiers(policy(verifier="gone"), SimpleNamespace(images=[checkerboard()]), {})


def test_nudenet_labels_map_exposed_classes_to_nudity():
    class FakeNudeNet:
        def detect(self, array):
            assert array.shape[-1] == 4  # nudenet reads numpy input as RGBA
            return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]},
                    {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 1, 1]},
                    {"class": "BUTTOCKS_EXPOSED", "score": 0.3, "box": [0, 0, 1, 1]}]

    verifier = NudeNetDetector(detector=FakeNudeNet())
    assert isinstance(verifier, Verifier)
    assert verifier([checkerboard()]) == [{"nudity", "FEMALE_BREAST_EXPOSED"}]
    assert set(NUDENET_LABELS.values()) == {"nudity"}
    assert not any("COVERED" in k or "FACE" in k for k in NUDENET_LABELS)


def test_real_nudenet_finds_nothing_in_a_plain_picture():
    verifier = default_verifiers()["nudenet"]
    plain = Image.new("RGB", (64, 64), (90, 140, 200))
    assert verifier([plain, checkerboard(64)]) == [set(), set()]


def test_shapes_verifier_sees_a_rendered_circle():
    weights = pathlib.Path(gie_guard.__file__).parent / "shapes" / "weights" / "detector.safetensors"
    if not weights.exists():
        pytest.skip(f"shapes-world detector weights not trained yet ({weights} is missing)")
    from gie_guard.shapes.world import Scene, Thing, render

    verifier = ShapesDetector()
    rng = np.random.default_rng(0)
    circle = Image.fromarray(render(Scene((Thing("circle", "red", "plain"),)), rng))
    square = Image.fromarray(render(Scene((Thing("square", "blue", "plain"),)), rng))
    found = verifier([circle, square])
    assert "circle" in found[0] and "circle" not in found[1]


def test_shapes_world_end_to_end_block_unless_erased():
    """On the trained shapes model, an unerased circle is blocked by the detector; erased, it passes."""
    weights = pathlib.Path(gie_guard.__file__).parent / "shapes" / "weights"
    if not (weights / "unet.safetensors").exists() or not (weights / "detector.safetensors").exists():
        pytest.skip(f"shapes-world weights not trained yet (nothing in {weights})")
    import torch
    from prometheus_client import CollectorRegistry

    from gie_guard import GuardMetrics
    from gie_guard.shapes import load_pipeline

    pipe = load_pipeline()
    outcomes = {}
    for scale in (0.0, 10.0):
        registry = CollectorRegistry()
        guard = Guard(policy={"name": "shapes", "concepts": [{"id": "circle", "text": "circle", "scale": scale,
                                                                "verify": {"verifier": "shapes", "action": "block"}}]},
                      metrics=GuardMetrics(registry), verifiers={"shapes": ShapesDetector()})  # the toy model's own detector
        try:
            guard(pipe, prompt="a red circle", num_inference_steps=10, generator=torch.Generator().manual_seed(0))
            outcomes[scale] = "ok"
        except ContentBlockedError as blocked:
            assert blocked.concept_ids == ("circle",)
            outcomes[scale] = "blocked"
        counted = {"policy": "shapes", "outcome": outcomes[scale]}
        assert registry.get_sample_value("gie_guard_generations_total", counted) == 1
    assert outcomes == {0.0: "blocked", 10.0: "ok"}


@pytest.mark.parametrize(("answer", "words"), [
    (lambda images: ["nudity" for _ in images], "a str for image 0"),  # read as {'n', 'u', ...}: blocked nothing
    (lambda images: [["nudity"] for _ in images], "a list for image 0"),
    (lambda images: tuple({"nudity"} for _ in images), "answered a tuple"),
    (lambda images: [{1} for _ in images], "a int label (1) for image 0"),
    (lambda images: {"nudity"}, "answered a set"),
])
def test_a_verifier_answer_of_the_wrong_type_fails_closed(answer, words):
    with pytest.raises(GuardedCallError, match=words.replace("(", r"\(").replace(")", r"\)")):
        run_verifiers(policy("block", labels=["nudity"]), SimpleNamespace(images=[checkerboard()]), {"fake": answer})
    # frozensets are fine
    out, found = run_verifiers(policy("block", labels=["nudity"]), SimpleNamespace(images=[checkerboard()]),
                               {"fake": lambda images: [frozenset({"nudity"}) for _ in images]})
    assert found.action == "block"
    with pytest.raises(ConfigurationError, match="not the string"):
        StaticVerifier("nudity")


def test_a_guarded_call_whose_verifier_answers_strings_is_withheld(sd_pipe):
    """action block, and a verifier that answers a label string per image: the call fails
    closed instead of returning the images (today's bug: nothing was blocked)."""
    from prometheus_client import CollectorRegistry

    from gie_guard import GuardMetrics

    registry = CollectorRegistry()
    metrics = GuardMetrics(registry)
    guard = Guard(policy={"name": "p", "concepts": [{"id": "nudity", "text": "nude", "scale": 1.0,
                                                       "verify": {"verifier": "words", "action": "block"}}]},
                  metrics=metrics, verifiers={"words": lambda images: ["nudity" for _ in images]})
    with pytest.raises(GuardedCallError, match="verifier 'words' answered a str for image 0"):
        guard(sd_pipe, prompt="a portrait", num_inference_steps=1, output_type="np")
    assert registry.get_sample_value("gie_guard_generations_total", {"policy": "p", "outcome": "error"}) == 1
    assert registry.get_sample_value("gie_guard_generations_total", {"policy": "p", "outcome": "ok"}) == 0
    # the same verifier answering sets blocks
    guard = Guard(policy={"name": "q", "concepts": [{"id": "nudity", "text": "nude", "scale": 1.0,
                                                       "verify": {"verifier": "words", "action": "block"}}]},
                  metrics=metrics, verifiers={"words": lambda images: [{"nudity"} for _ in images]})
    with pytest.raises(ContentBlockedError):
        guard(sd_pipe, prompt="a portrait", num_inference_steps=1, output_type="np")


def test_shapes_is_not_a_default_verifier_but_the_error_says_how_to_add_it():
    assert set(default_verifiers()) == {"nudenet"}
    with pytest.raises(PolicyError, match=r"unknown verifier 'shapes'.*gie_guard\.detectors\.create\('shapes'\)"):
        Guard(policy={"name": "p", "concepts": [{"id": "circle", "text": "circle", "scale": 1.0,
                                                  "verify": {"verifier": "shapes"}}]})


def test_old_verifier_names_are_deprecated_aliases():
    import gie_guard.verifiers as verifiers

    with pytest.warns(DeprecationWarning, match="gie_guard.detectors.nudenet.NudeNetDetector"):
        assert verifiers.NudeNetVerifier is NudeNetDetector
    with pytest.warns(DeprecationWarning):
        assert verifiers.ShapesVerifier is ShapesDetector
    with pytest.warns(DeprecationWarning):
        assert verifiers.NUDENET_LABELS is NUDENET_LABELS
    assert verifiers.ContentBlockedError is ContentBlockedError and issubclass(ContentBlockedError, gie_guard.GuardError)
