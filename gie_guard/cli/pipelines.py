"""The model behind ``--pipeline`` of ``gie-guard demo``, ``explain`` and ``adapter train``.

    shapes       the shapes-world model trained in this project (packaged weights, or --weights DIR)
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

__all__ = ["LoadedPipeline", "add_pipeline_option", "load_pipeline", "pipeline_kind"]

NAMES = ("shapes", "tiny", "auto")


@dataclass(frozen=True)
class LoadedPipeline:
    """A loaded pipeline; ``kind`` is ``shapes``, ``tiny``, ``folder`` or ``factory``."""

    pipe: Any
    kind: str
    description: str


def add_pipeline_option(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    parser.add_argument(
        "--pipeline", default=default, required=default is None, metavar="MODEL",
        help="'shapes' (the shapes-world model), 'tiny' (random test pipeline), 'auto' (shapes when its weights "
             "exist, else tiny), a local diffusers folder, or module:function" + (f" (default: {default})" if default else ""),
    )
    parser.add_argument("--weights", metavar="DIR", help="folder of shapes-world weights (default: the packaged ones)")


def pipeline_kind(spec: str, weights: str | None = None) -> str:
    """What ``--pipeline spec`` loads, without loading it: ``shapes``, ``tiny``, ``folder`` or
    ``factory`` (a ConfigurationError for anything else)."""
    if spec == "auto":
        return "shapes" if _shapes_weights(weights).joinpath("unet.safetensors").is_file() else "tiny"
    if spec in ("shapes", "tiny"):
        return spec
    if pathlib.Path(spec).is_dir():
        return "folder"
    if ":" in spec:
        return "factory"
    raise ConfigurationError(
        f"--pipeline {spec!r} is none of shapes, tiny, auto, an existing diffusers folder or module:function"
    )


def load_pipeline(spec: str, *, weights: str | None = None, tiny_size: int = 8) -> LoadedPipeline:
    """Load what ``--pipeline spec`` names (see the module docstring). ``tiny_size``: image
    size of the tiny pipeline."""
    kind = pipeline_kind(spec, weights)
    if kind == "shapes":
        loaded = LoadedPipeline(_shapes(weights), "shapes", f"the shapes-world model ({weights or 'gie_guard.shapes'})")
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


def _shapes(weights: str | None) -> Any:
    folder = _shapes_weights(weights)
    missing = [n for n in ("model.json", "unet.safetensors", "vae.safetensors", "sink.safetensors")
               if not (folder / n).is_file()]
    if missing:
        raise ConfigurationError(f"--pipeline shapes: no shapes-world weights in {folder} (missing {', '.join(missing)})")
    from ..shapes import load_pipeline as load_shapes

    return load_shapes(weights_dir=folder)


def _folder(path: str) -> Any:
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True)
