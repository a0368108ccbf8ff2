"""The shapes world: a tiny, real Stable Diffusion pipeline trained offline on rendered
shapes, and a detector that judges its images. See docs/shapes.md."""

from .detector import Detector, load_detector
from .model import load_pipeline

__all__ = ["Detector", "load_detector", "load_pipeline"]
