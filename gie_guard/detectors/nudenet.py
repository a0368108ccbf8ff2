"""NudeNet as a :class:`~gie_guard.detectors.Detector` (``pip install 'gie-guard[nudity]'``).

The one label mapping gie_guard uses for NudeNet, everywhere (verifiers and judges):
:data:`NUDENET_LABELS`. An image is labelled ``nudity`` when NudeNet detects one of these
exposed classes with a score of at least ``threshold`` (default 0.5); the raw class name is
a label too, so a policy can ask for ``labels: [FEMALE_BREAST_EXPOSED]``. Covered body parts,
faces, feet, bellies, armpits and ``MALE_BREAST_EXPOSED`` are not nudity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigurationError, MissingDependencyError
from . import as_pil_images

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["NUDENET_LABELS", "NudeNetDetector", "load_nudenet"]

# NudeNet 3.4 class -> gie_guard label.
NUDENET_LABELS: Mapping[str, str] = {
    "FEMALE_BREAST_EXPOSED": "nudity",
    "FEMALE_GENITALIA_EXPOSED": "nudity",
    "MALE_GENITALIA_EXPOSED": "nudity",
    "BUTTOCKS_EXPOSED": "nudity",
    "ANUS_EXPOSED": "nudity",
}


def load_nudenet() -> Any:
    """NudeNet's ``NudeDetector`` (it ships its ONNX model), or MissingDependencyError."""
    try:
        from nudenet import NudeDetector
    except ImportError as exc:
        raise MissingDependencyError("nudenet", "nudity", needed_for="the NudeNet detector") from exc
    return NudeDetector()


class NudeNetDetector:
    """NudeNet's detector with :data:`NUDENET_LABELS`. ``detector`` is anything with NudeNet's
    ``detect(rgba_array) -> [{"class", "score", "box"}]`` (default: a new ``NudeDetector``)."""

    def __init__(self, threshold: float = 0.5, *, labels: Mapping[str, str] = NUDENET_LABELS, detector: Any = None) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigurationError(f"NudeNet threshold must be within [0, 1], got {threshold}")
        self.detector = detector if detector is not None else load_nudenet()
        self.threshold = threshold
        self.labels = dict(labels)

    def detections(self, image: Image.Image) -> list[dict[str, Any]]:
        """NudeNet's raw detections ({class, score, box}) for one image."""
        # NudeNet reads a numpy array as RGBA (it converts to BGR itself).
        found: list[dict[str, Any]] = self.detector.detect(np.ascontiguousarray(np.asarray(image.convert("RGBA"))))
        return found

    def __call__(self, images: Sequence[Image.Image] | np.ndarray) -> list[set[str]]:
        out = []
        for image in as_pil_images(images):
            found: set[str] = set()
            for d in self.detections(image):
                if d["score"] >= self.threshold and d["class"] in self.labels:
                    found |= {self.labels[d["class"]], d["class"]}
            out.append(found)
        return out
