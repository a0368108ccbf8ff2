"""The model behind ``--pipeline`` of ``gie-guard demo``, ``explain`` and ``adapter train``.

    shapes       the shapes-world model trained in this project (packaged weights, or --weights DIR);
                 with --backbone dit (demo, explain) its transformer (SD3-family) model
    tiny         a tiny random-weight SD 1.x pipeline (gie_guard.testing): draws nothing, runs fast
    auto         shapes when its weights exist, else tiny
    DIR          a local diffusers folder (from_pretrained, local files and safetensors only)
    module:attr  a function or class that returns a pipeline when called with no arguments

torch and diffusers are imported when a pipeline is loaded, not before.
"""

from __future__ import annotations

import argparse
import pathlib
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from ..logs import quiet_loading

__all__ = ["LoadedPipeline", "add_pipeline_option", "load_pipeline", "pipeline_kind"]

NAMES = ("shapes", "tiny", "auto")
BACKBONES = ("unet", "dit")


@dataclass(frozen=True)
class LoadedPipeline:
    """A loaded pipeline; ``kind`` is ``shapes``, ``tiny``, ``folder`` or ``factory``."""

    pipe: Any
    kind: str
    description: str


def add_pipeline_option(parser: argparse.ArgumentParser, *, default: str | None = None, backbone: bool = False) -> None:
    """``--pipeline`` and ``--weights``; with ``backbone``, also ``--backbone unet|dit`` (which
    shapes-world model ``shapes`` and ``auto`` load)."""
    parser.add_argument(
        "--pipeline", default=default, required=default is None, metavar="MODEL",
        help="'shapes' (the shapes-world model), 'tiny' (random test pipeline), 'auto' (shapes when its weights "
             "exist, else tiny), a local diffusers folder, or module:function" + (f" (default: {default})" if default else ""),
    )
    parser.add_argument("--weights", metavar="DIR", help="folder of shapes-world weights (default: the packaged ones)")
    if backbone:
        parser.add_argument(
            "--backbone", default="unet", choices=BACKBONES,
            help="which shapes-world model --pipeline shapes (or auto) loads: 'unet' (StableDiffusionPipeline) or "
                 "'dit' (the transformer, a StableDiffusion3Pipeline) (default: unet)",
        )


def pipeline_kind(spec: str, weights: str | None = None, backbone: str = "unet") -> str:
    """What ``--pipeline spec`` loads, without loading it: ``shapes``, ``tiny``, ``folder`` or
    ``factory`` (a ConfigurationError for anything else). ``backbone`` is the shapes-world
    model's (``unet`` or ``dit``); ``dit`` names the shapes world only."""
    if backbone not in BACKBONES:
        raise ConfigurationError(f"--backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
    if spec == "auto":
        present = _shapes_weights(weights).joinpath(_SHAPES_MARKER[backbone]).is_file()
        kind = "shapes" if present else "tiny"
    elif spec in ("shapes", "tiny"):
        kind = spec
    elif pathlib.Path(spec).is_dir():
        kind = "folder"
    elif ":" in spec:
        kind = "factory"
    else:
        raise ConfigurationError(
            f"--pipeline {spec!r} is none of shapes, tiny, auto, an existing diffusers folder or module:function"
        )
    if backbone != "unet" and kind != "shapes":
        raise ConfigurationError(
            f"--backbone {backbone} chooses a shapes-world model; --pipeline {spec} loads "
            + ("the tiny SD 1.x pipeline (no transformer shapes weights found)" if spec == "auto" else f"a {kind} pipeline")
        )
    return kind


@quiet_loading()
def load_pipeline(spec: str, *, weights: str | None = None, tiny_size: int = 8, backbone: str = "unet") -> LoadedPipeline:
    """Load what ``--pipeline spec`` names (see the module docstring). ``tiny_size``: image
    size of the tiny pipeline; ``backbone``: the shapes-world model's, ``unet`` or ``dit``."""
    kind = pipeline_kind(spec, weights, backbone)
    if kind == "shapes":
        which = "the transformer (SD3-family) shapes-world model" if backbone == "dit" else "the shapes-world model"
        loaded = LoadedPipeline(_shapes(weights, backbone), "shapes", f"{which} ({weights or 'gie_guard.shapes'})")
    elif kind == "tiny":
        from ..testing import tiny_sd_pipeline

        loaded = LoadedPipeline(tiny_sd_pipeline(sample_size=tiny_size), "tiny",
                                "a tiny random-weight SD 1.x pipeline (gie_guard.testing)")
    elif kind == "folder":
        loaded = LoadedPipeline(_folder(spec), "folder", f"the diffusers pipeline in {spec}")
    else:
        from ..detectors import import_object

        factory = import_object(spec)
        if not callable(factory):
            raise ConfigurationError(f"--pipeline {spec}: a {type(factory).__name__} is not a function or class")
        loaded = LoadedPipeline(factory(), "factory", f"the pipeline from {spec}")
    if hasattr(loaded.pipe, "set_progress_bar_config"):
        loaded.pipe.set_progress_bar_config(disable=True)
    return loaded


def _shapes_weights(weights: str | None) -> pathlib.Path:
    if weights is not None:
        return pathlib.Path(weights)
    import importlib.util

    spec = importlib.util.find_spec("gie_guard.shapes")  # without importing it (torch)
    assert spec is not None and spec.submodule_search_locations
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "weights"


# the files each shapes-world backbone loads, and the one whose presence --pipeline auto checks
_SHAPES_FILES = {
    "unet": ("model.json", "unet.safetensors", "vae.safetensors", "sink.safetensors"),
    "dit": ("dit_model.json", "dit_transformer.safetensors", "dit_text.safetensors", "vae.safetensors"),
}
_SHAPES_MARKER = {"unet": "unet.safetensors", "dit": "dit_transformer.safetensors"}


def _shapes(weights: str | None, backbone: str = "unet") -> Any:
    folder = _shapes_weights(weights)
    missing = [n for n in _SHAPES_FILES[backbone] if not (folder / n).is_file()]
    if missing:
        what = "transformer shapes-world" if backbone == "dit" else "shapes-world"
        raise ConfigurationError(f"--pipeline shapes: no {what} weights in {folder} (missing {', '.join(missing)})")
    from ..shapes import load_pipeline as load_shapes

    return load_shapes(weights_dir=folder, backbone=backbone)


def _folder(path: str) -> Any:
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True)
