"""The shapes world: a tiny, real Stable Diffusion pipeline trained offline on rendered
shapes, and a detector that judges its images. `load_pipeline(backbone="dit")` gives the
transformer (SD3-family) model instead of the UNet. See docs/shapes.md."""

from ..logs import quiet_loading

with quiet_loading():  # importing diffusers' pipelines makes transformers warn that torchvision is missing
    from .detector import Detector, load_detector
    from .model import load_pipeline

__all__ = ["Detector", "load_detector", "load_pipeline"]
