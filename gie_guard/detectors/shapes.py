"""The toy shapes-world detector as a :class:`~gie_guard.detectors.Detector`.

Labels are the canonical attribute words of the shapes world (``circle``, ``red``,
``striped``, ...; ``gie_guard.shapes.world.ATTRIBUTES``). It judges 32x32 images of the
shapes model only, so it is no library default: code that runs that model registers it
explicitly (``Guard(verifiers={"shapes": ShapesDetector()})``). Importing this module does not
import ``gie_guard.shapes``; building a detector does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from . import as_pil_images

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

__all__ = ["ShapesDetector", "attribute_group", "canonical_word"]


class ShapesDetector:
    """The trained shapes-world attribute detector (``gie_guard.shapes.load_detector``).
    ``weights``: a detector weights file (default: the packaged one); ``detector``: an
    already loaded ``gie_guard.shapes.Detector`` to share."""

    def __init__(self, weights: str | None = None, *, detector: Any = None) -> None:
        if detector is None:
            from ..shapes import load_detector

            detector = load_detector(weights)
        self.detector = detector

    def __call__(self, images: Sequence[Image.Image] | np.ndarray) -> list[set[str]]:
        return [set(found) for found in self.detector(as_pil_images(images))]


def canonical_word(word: str) -> str:
    """The shapes world's canonical attribute for ``word`` (synonyms and held-out synonyms
    included: ``disc`` -> ``circle``). Unknown words are a ConfigurationError."""
    from ..shapes.world import HELD_OUT_WORDS, TRAIN_WORDS

    w = word.strip().lower()
    for canonical, words in list(TRAIN_WORDS.items()) + list(HELD_OUT_WORDS.items()):
        if w == canonical or w in words:
            return canonical
    known = sorted({x for xs in TRAIN_WORDS.values() for x in xs})
    raise ConfigurationError(f"the shapes detector does not know the concept {word!r}; it knows {', '.join(known)}")


def attribute_group(canonical: str) -> tuple[str, ...]:
    """The kind ``canonical`` belongs to: all shapes, all colours or all styles."""
    from ..shapes.world import COLOURS, SHAPES, STYLES

    for group in (SHAPES, COLOURS, STYLES):
        if canonical in group:
            return tuple(group)
    raise ConfigurationError(f"{canonical!r} is not a shapes-world attribute")
