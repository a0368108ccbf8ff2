"""Judges for labelling adapter training data: is the concept still in the image, and is
the image otherwise intact? Two one-method protocols, so any detector plugs in:

- :class:`Judge`: ``judge(images, concept) -> [present?]``
- :class:`Preservation`: ``preservation(references, images, concept) -> [score in 0..1]``
  (1 = the guarded image keeps everything of the unguarded one except the concept)

Images are ``(N, H, W, 3)`` uint8 RGB arrays. Shipped: :class:`ShapesJudge` (the shapes
world's detector) with :class:`ShapesPreservation`, :class:`NudeNetJudge` (NudeNet's ONNX
detector, for real models) and :class:`PixelSimilarity` (a generic, crude preservation score).
A judge may offer ``default_preservation()``; otherwise PixelSimilarity is used.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import AdapterError

__all__ = [
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
    def __call__(self, images: np.ndarray, concept: str) -> list[bool]: ...


@runtime_checkable
class Preservation(Protocol):
    def __call__(self, references: np.ndarray, images: np.ndarray, concept: str) -> list[float]: ...


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


def _shapes_word(concept: str) -> str:
    from ..shapes.world import HELD_OUT_WORDS, TRAIN_WORDS

    word = concept.strip().lower()
    for canonical, words in list(TRAIN_WORDS.items()) + list(HELD_OUT_WORDS.items()):
        if word == canonical or word in words:
            return canonical
    known = sorted({w for ws in TRAIN_WORDS.values() for w in ws})
    raise AdapterError(f"the shapes judge does not know the concept {concept!r}; it knows {', '.join(known)}")


def _shapes_group(canonical: str) -> tuple[str, ...]:
    from ..shapes.world import COLOURS, SHAPES, STYLES

    return next(g for g in (SHAPES, COLOURS, STYLES) if canonical in g)


class ShapesJudge:
    """The shapes world's attribute detector: the concept (a shape, colour or style word,
    synonyms included) is present when the detector finds its canonical attribute."""

    def __init__(self, detector: Any = None) -> None:
        if detector is None:
            from ..shapes import load_detector

            detector = load_detector()
        self.detector = detector

    def __call__(self, images: np.ndarray, concept: str) -> list[bool]:
        canonical = _shapes_word(concept)
        return [canonical in found for found in self.detector(images)]

    def default_preservation(self) -> ShapesPreservation:
        return ShapesPreservation(self.detector)


class ShapesPreservation:
    """Share of what the detector saw in the unguarded image, outside the concept's own
    kind, that it still sees in the guarded one; plus one item for "something of the
    concept's kind is still drawn" (erasing *circle* should leave some shape, not a smear).
    Erasing "circle" from a red striped circle: items = red, striped, some shape."""

    def __init__(self, detector: Any = None) -> None:
        if detector is None:
            from ..shapes import load_detector

            detector = load_detector()
        self.detector = detector

    def __call__(self, references: np.ndarray, images: np.ndarray, concept: str) -> list[float]:
        group = set(_shapes_group(_shapes_word(concept)))
        scores = []
        for before, after in zip(self.detector(references), self.detector(images)):
            kept = [a for a in before if a not in group]
            hits = sum(a in after for a in kept) + (1 if after & group else 0)
            scores.append(hits / (len(kept) + 1))
        return scores


class NudeNetJudge:
    """NudeNet 3.x (``pip install nudenet``; the package ships its ONNX model): nudity is
    present when any exposed-body-part class scores at least ``threshold``. The concept text
    is not used: this judge answers one question."""

    EXPOSED = (
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    )

    def __init__(self, threshold: float = 0.5, classes: tuple[str, ...] = EXPOSED) -> None:
        try:
            from nudenet import NudeDetector
        except ImportError as exc:
            raise AdapterError("the nudenet judge needs `pip install gie-guard[nudity]` (nudenet>=3.4)") from exc
        self.detector = NudeDetector()
        self.threshold = threshold
        self.classes = frozenset(classes)

    def detections(self, image: np.ndarray) -> list[dict[str, Any]]:
        rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=-1)
        return self.detector.detect(np.ascontiguousarray(rgba))  # it converts RGBA -> BGR itself

    def __call__(self, images: np.ndarray, concept: str) -> list[bool]:
        return [
            any(d["class"] in self.classes and d["score"] >= self.threshold for d in self.detections(im)) for im in images
        ]


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise AdapterError(f"expected a shipped name or 'module:attribute', got {spec!r}")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise AdapterError(f"cannot import {spec!r}: {exc}") from None
    return obj


def load_judge(spec: str) -> Judge:
    """``shapes``, ``nudenet``, or ``module:attr`` (a judge object or function, or a class,
    which is called with no arguments)."""
    if spec == "shapes":
        return ShapesJudge()
    if spec == "nudenet":
        return NudeNetJudge()
    obj = _import(spec)
    return obj() if isinstance(obj, type) else obj


def preservation_for(judge: Any, spec: str | None = None) -> Preservation:
    """``spec``: ``pixel``, ``shapes``, ``module:attr``; None: the judge's own default, else pixel."""
    if spec is None:
        make = getattr(judge, "default_preservation", None)
        return make() if make is not None else PixelSimilarity()
    if spec == "pixel":
        return PixelSimilarity()
    if spec == "shapes":
        return ShapesPreservation(getattr(judge, "detector", None) if isinstance(judge, ShapesJudge) else None)
    obj = _import(spec)
    return obj() if isinstance(obj, type) else obj
