"""Detectors: one protocol, one module per detector, a registry by name; verifiers and
judges are thin uses of it."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from gie_guard import ConfigurationError, GuardError, MissingDependencyError, detectors
from gie_guard.adapters import judges
from gie_guard.adapters.judges import NudeNetJudge, ShapesJudge, ShapesPreservation, load_judge
from gie_guard.detectors import Detector
from gie_guard.detectors.nudenet import NUDENET_LABELS, NudeNetDetector
from gie_guard.detectors.shapes import ShapesDetector, canonical_word


class NudeNetOutput:
    """Stands in for NudeNet's model output only (no nude image can be used in tests):
    ``detect(rgba) -> [{class, score, box}]`` as NudeNet 3.4 answers."""

    def __init__(self, *found):
        self.found = [{"class": c, "score": s, "box": [0, 0, 1, 1]} for c, s in found]

    def detect(self, array):
        assert array.ndim == 3 and array.shape[-1] == 4
        return self.found


class Bright:
    """A real (if trivial) detector: 'bright' when the mean pixel is above 127."""

    def __call__(self, images):
        return [{"bright"} if np.asarray(im).mean() > 127 else set() for im in images]


def test_the_registry_knows_the_shipped_detectors_and_takes_more():
    assert {"nudenet", "shapes"} <= set(detectors.names())
    with pytest.raises(ConfigurationError, match="unknown detector 'nope'"):
        detectors.create("nope")
    detectors.register("bright-test", Bright, replace=True)
    bright = detectors.create("bright-test")
    assert isinstance(bright, Detector)
    assert bright([Image.new("RGB", (4, 4), "white"), Image.new("RGB", (4, 4), "black")]) == [{"bright"}, set()]
    assert detectors.shared("bright-test") is detectors.shared("bright-test")
    with pytest.raises(ConfigurationError, match="registered already"):
        detectors.register("bright-test", Bright)
    with pytest.raises(ConfigurationError, match="detector name"):
        detectors.register("no spaces", Bright)
    assert isinstance(detectors.create("test_detectors:Bright"), Bright)  # module:attr (tests/ is on sys.path)
    with pytest.raises(ConfigurationError, match="cannot import"):
        detectors.create("test_detectors:Missing")


def test_one_nudenet_label_mapping_for_verifiers_and_judges():
    found = NudeNetOutput(("FEMALE_BREAST_EXPOSED", 0.9), ("FACE_FEMALE", 0.99), ("BUTTOCKS_EXPOSED", 0.3))
    detector = NudeNetDetector(detector=found)
    assert isinstance(detector, Detector)
    assert detector([Image.new("RGB", (8, 8))]) == [{"nudity", "FEMALE_BREAST_EXPOSED"}]
    # the judge is the same detector with the same mapping, asked for `nudity`
    judge = NudeNetJudge(detector=found)
    assert isinstance(judge.detector, NudeNetDetector) and judge.detector.labels == dict(NUDENET_LABELS)
    assert judge(np.zeros((2, 8, 8, 3), np.uint8), "anything") == [True, True]
    assert NudeNetJudge(detector=NudeNetOutput(("FACE_FEMALE", 0.99)))(np.zeros((1, 8, 8, 3), np.uint8), "x") == [False]
    assert set(NUDENET_LABELS.values()) == {"nudity"}
    assert not any("COVERED" in k or "FACE" in k or k == "MALE_BREAST_EXPOSED" for k in NUDENET_LABELS)
    with pytest.raises(ConfigurationError, match="threshold"):
        NudeNetDetector(threshold=2.0, detector=found)


def test_the_real_nudenet_answers_through_every_path():
    plain = np.full((2, 64, 64, 3), 200, np.uint8)
    assert NudeNetJudge()(plain, "nudity") == [False, False]
    assert detectors.create("nudenet")([Image.fromarray(a) for a in plain]) == [set(), set()]


def test_a_missing_nudenet_is_one_error_everywhere(monkeypatch):
    from gie_guard.verifiers import default_verifiers

    monkeypatch.setitem(sys.modules, "nudenet", None)  # what an environment without the package looks like
    monkeypatch.setattr(detectors, "_SHARED", {})
    attempts = [lambda: NudeNetDetector(), lambda: NudeNetJudge(), lambda: load_judge("nudenet"),
                lambda: detectors.create("nudenet"), lambda: default_verifiers()["nudenet"]([Image.new("RGB", (8, 8))])]
    for attempt in attempts:
        with pytest.raises(MissingDependencyError, match=r"pip install 'gie-guard\[nudity\]'") as caught:
            attempt()
        assert isinstance(caught.value, (ConfigurationError, GuardError, ImportError)) and caught.value.extra == "nudity"


def _circle_and_square():
    from gie_guard.shapes.world import Scene, Thing, render

    rng = np.random.default_rng(0)
    return (render(Scene((Thing("circle", "red", "plain"),)), rng)[None],
            render(Scene((Thing("square", "blue", "striped"),)), rng)[None])


def test_the_shapes_detector_serves_the_judge_and_preservation_once():
    from gie_guard.shapes.detector import WEIGHTS

    if not WEIGHTS.exists():
        pytest.skip(f"shapes-world detector weights not trained yet ({WEIGHTS} is missing)")
    circle, square = _circle_and_square()
    detector = ShapesDetector()
    assert isinstance(detector, Detector)
    assert "circle" in detector(circle)[0] and "circle" not in detector([Image.fromarray(square[0])])[0]
    judge = ShapesJudge(detector)
    assert judge.detector is detector and judge.default_preservation().detector is detector
    assert judge(circle, "disc") == [True] and judge(square, "circle") == [False]
    assert judges.preservation_for(judge, "shapes").detector is detector
    assert ShapesPreservation(detector)(circle, circle, "circle") == [1.0]
    assert canonical_word("Disc") == "circle"
    with pytest.raises(ConfigurationError, match="does not know the concept 'banana'"):
        canonical_word("banana")


def test_nothing_on_the_default_path_imports_the_shapes_world():
    code = textwrap.dedent("""
        import sys
        from gie_guard.verifiers import default_verifiers
        from gie_guard import detectors
        import gie_guard.adapters.judges, gie_guard.adapters.commands, gie_guard.cli, gie_guard.detectors.shapes
        assert set(default_verifiers()) == {"nudenet"}
        assert "shapes" in detectors.names()
        loaded = sorted(m for m in sys.modules if m.startswith(("gie_guard.shapes", "gie_guard.testing", "nudenet")))
        print(loaded)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_adapter_commands_use_no_private_helpers():
    import gie_guard.adapters.commands as commands

    assert not hasattr(judges, "_import") and not hasattr(judges, "_shapes_word")
    source = open(commands.__file__, encoding="utf-8").read()
    assert "tiny_sd_pipeline" not in source and "judges import _" not in source
