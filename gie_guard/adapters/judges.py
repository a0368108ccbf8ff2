"""Judges for labelling adapter training data: is the concept still in the image, and is
the image otherwise intact? Two one-method protocols, so any detector plugs in:

- :class:`Judge`: ``judge(images, concept) -> [present?]``
- :class:`Preservation`: ``preservation(references, images, concept) -> [score in 0..1]``
  (1 = the guarded image keeps everything of the unguarded one except the concept)

Images are ``(N, H, W, 3)`` uint8 RGB arrays. Judges are thin uses of a
:class:`gie_guard.detectors.Detector` (:class:`DetectorJudge`): :class:`ShapesJudge` (the
shapes world's detector) with :class:`ShapesPreservation`, :class:`NudeNetJudge` (NudeNet,
for real models; the label mapping of ``gie_guard.detectors.nudenet``) and
:class:`PixelSimilarity` (a generic, crude preservation score). A judge may offer
``default_preservation()``; otherwise PixelSimilarity is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..detectors import Detector, as_pil_images, import_object
from ..errors import ConfigurationError
from ..verifiers import check_answer

__all__ = [
    "DetectorJudge",
    "Judge",
    "NudeNetJudge",
    "PixelSimilarity",
    "Preservation",
    "ShapesJudge",
    "ShapesPreservation",
    "load_judge",
    "preservation_for",
]


@runtime_checkable
class Judge(Protocol):
    def __call__(self, images: np.ndarray, concept: str, /) -> list[bool]: ...


@runtime_checkable
class Preservation(Protocol):
    def __call__(self, references: np.ndarray, images: np.ndarray, concept: str, /) -> list[float]: ...


class PixelSimilarity:
    """``1 - mean |reference - image| / 255`` on 16x16 block means: 1 for an unchanged image,
    about 0.6-0.7 for an unrelated one. Crude (it also penalises the intended change), so
    use a bound well below 1, or a semantic score where one exists."""

    def __init__(self, size: int = 16) -> None:
        self.size = size

    def _pool(self, images: np.ndarray) -> np.ndarray:
        n, h, w, c = images.shape
        s = self.size if h % self.size == 0 and w % self.size == 0 else 1
        x = images.astype(np.float32).reshape(n, s, h // s, s, w // s, c) if s > 1 else images.astype(np.float32)
        return x.mean(axis=(2, 4)) if s > 1 else x

    def __call__(self, references: np.ndarray, images: np.ndarray, concept: str) -> list[float]:
        diff = np.abs(self._pool(references) - self._pool(images)).mean(axis=(1, 2, 3)) / 255.0
        return [float(1.0 - d) for d in diff]


class DetectorJudge:
    """A judge from a :class:`~gie_guard.detectors.Detector`: the concept is present in an
    image when the detector finds its label there. ``label(concept)`` maps the concept text
    to the detector's label (default: the text itself)."""

    def __init__(self, detector: Detector, label: Callable[[str], str] | None = None) -> None:
        self.detector = detector
        self._label = label or (lambda concept: concept)

    def __call__(self, images: np.ndarray, concept: str) -> list[bool]:
        wanted = self._label(concept)
        found = check_answer(type(self.detector).__name__, self.detector(as_pil_images(images)), len(images))
        return [wanted in labels for labels in found]


class ShapesJudge(DetectorJudge):
    """The shapes world's detector: the concept (a shape, colour or style word, synonyms
    included) is present when the detector finds its canonical attribute."""

    def __init__(self, detector: Any = None) -> None:
        from ..detectors.shapes import ShapesDetector, canonical_word

        if not isinstance(detector, ShapesDetector):
            detector = ShapesDetector(detector=detector)  # None: load the packaged weights
        super().__init__(detector, canonical_word)

    def default_preservation(self) -> ShapesPreservation:
        return ShapesPreservation(self.detector)


class ShapesPreservation:
    """Share of what the detector saw in the unguarded image, outside the concept's own
    kind, that it still sees in the guarded one; plus one item for "something of the
    concept's kind is still drawn" (erasing *circle* should leave some shape, not a smear).
    Erasing "circle" from a red striped circle: items = red, striped, some shape."""

    def __init__(self, detector: Any = None) -> None:
        from ..detectors.shapes import ShapesDetector

        self.detector = detector if isinstance(detector, ShapesDetector) else ShapesDetector(detector=detector)

    def __call__(self, references: np.ndarray, images: np.ndarray, concept: str) -> list[float]:
        from ..detectors.shapes import attribute_group, canonical_word

        group = set(attribute_group(canonical_word(concept)))
        scores = []
        for before, after in zip(self.detector(as_pil_images(references)), self.detector(as_pil_images(images))):
            kept = [a for a in before if a not in group]
            hits = sum(a in after for a in kept) + (1 if after & group else 0)
            scores.append(hits / (len(kept) + 1))
        return scores


class NudeNetJudge(DetectorJudge):
    """NudeNet (``pip install 'gie-guard[nudity]'``) with the one label mapping of
    :mod:`gie_guard.detectors.nudenet`: nudity is present when the detector labels the image
    ``nudity``. The concept text is not used: this judge answers one question."""

    def __init__(self, threshold: float = 0.5, *, detector: Any = None) -> None:
        from ..detectors.nudenet import NudeNetDetector

        super().__init__(NudeNetDetector(threshold, detector=detector), lambda _concept: "nudity")


def load_judge(spec: str) -> Judge:
    """``shapes``, ``nudenet``, or ``module:attr`` (a judge object or function, or a class,
    which is called with no arguments)."""
    if spec == "shapes":
        return ShapesJudge()
    if spec == "nudenet":
        return NudeNetJudge()
    judge = _instance(import_object(spec))
    if not isinstance(judge, Judge):
        raise ConfigurationError(f"judge {spec!r} is a {type(judge).__name__}, which cannot be called on images")
    return judge


def _instance(obj: Any) -> Any:
    """An imported judge or preservation measure: a class is called with no arguments."""
    return obj() if isinstance(obj, type) else obj


def preservation_for(judge: Any, spec: str | None = None) -> Preservation:
    """``spec``: ``pixel``, ``shapes``, ``module:attr``; None: the judge's own default, else pixel."""
    if spec is None:
        make = getattr(judge, "default_preservation", None)
        if make is None:
            return PixelSimilarity()
        measure = make()
    elif spec == "pixel":
        return PixelSimilarity()
    elif spec == "shapes":
        return ShapesPreservation(judge.detector if isinstance(judge, ShapesJudge) else None)
    else:
        measure = _instance(import_object(spec))
    if not isinstance(measure, Preservation):
        raise ConfigurationError(
            f"preservation measure {spec or type(judge).__name__ + '.default_preservation()'!r} is a "
            f"{type(measure).__name__}, which cannot be called on images"
        )
    return measure
