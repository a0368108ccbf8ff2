"""The model behind ``gie-guard evaluate --model``.

    shapes        the shapes-world StableDiffusionPipeline trained in this project (packaged)
    shapes-dit    the transformer (SD3-style) shapes model, once its weights are packaged
    DIR           a local diffusers pipeline folder (``from_pretrained``, local files and
                  safetensors only, never a download)
    module:attr   a function or class that returns a pipeline when called with no arguments

Unlike the demo's loader (gie_guard.cli.pipelines) this one places the pipeline on a device
in a dtype, gives each model its sampling defaults, and checks up front that gie_guard can
guard the pipeline (a folder holding an unsupported pipeline is an error before anything is
generated). torch and diffusers are imported when a model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, UnsupportedPipelineError
from ..logs import quiet_loading

__all__ = ["LoadedModel", "dit_weights_present", "load_model", "resolve_device", "resolve_dtype"]

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class LoadedModel:
    pipe: Any
    spec: str  # what --model said
    kind: str  # shapes, shapes-dit, folder, factory
    description: str
    identity: str  # what the images depend on: part of every image's key
    family: str  # gie_guard engine family ("sd", "sdxl", "sd3", "flux", ...)
    steps: int  # default denoising steps
    guidance: float | None  # default guidance (None: the pipeline's own default)
    batch_size: int  # default images per call
    device: str
    dtype: str

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.spec, "kind": self.kind, "description": self.description,
            "pipeline_class": type(self.pipe).__name__, "family": self.family, "device": self.device,
            "dtype": self.dtype, "identity": self.identity,
        }


def _shapes_dir() -> pathlib.Path:
    import importlib.util

    spec = importlib.util.find_spec("gie_guard.shapes")
    assert spec is not None and spec.submodule_search_locations
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "weights"


def dit_weights_present() -> bool:
    """Whether the transformer shapes model's weights are packaged (it is being trained)."""
    try:
        from ..shapes.dit_model import FILES
    except Exception:
        return False
    return all((_shapes_dir() / name).is_file() for name in FILES.values())


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigurationError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigurationError(f"--device {device}: torch sees no CUDA device on this machine")
    return device


def resolve_dtype(dtype: str | None, device: str, kind: str) -> str:
    """``auto``: float16 on an accelerator for a folder model, else float32."""
    if dtype in (None, "auto"):
        return "float16" if kind == "folder" and not device.startswith("cpu") else "float32"
    if dtype not in DTYPES:
        raise ConfigurationError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)} or auto")
    return dtype


def model_kind(spec: str) -> str:
    if spec in ("shapes", "shapes-dit"):
        return spec
    if pathlib.Path(spec).is_dir():
        return "folder"
    if ":" in spec and not pathlib.Path(spec).exists():
        return "factory"
    raise ConfigurationError(
        f"--model {spec!r} is none of 'shapes', 'shapes-dit', an existing diffusers pipeline folder, or module:function"
    )


@quiet_loading()
def load_model(spec: str, *, device: str | None = None, dtype: str | None = None,
               keep_safety_checker: bool = False) -> LoadedModel:
    """Load what ``--model spec`` names, on ``device`` in ``dtype``, and check that gie_guard
    can guard it. A folder's safety checker (SD 1.x) is left out unless ``keep_safety_checker``:
    it replaces images it flags by black ones, which would hide from the judge what the
    unguarded model draws."""
    kind = model_kind(spec)
    if kind == "folder":
        _check_folder(pathlib.Path(spec))  # before torch loads: a clear message for a wrong folder
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, kind)
    import torch

    torch_dtype = getattr(torch, dtype)
    steps, guidance, batch = 50, None, 1
    if kind == "shapes":
        from ..shapes import load_pipeline

        pipe = load_pipeline(device)
        description = "the shapes-world model (StableDiffusionPipeline, 32x32, packaged weights)"
        identity = "shapes:" + _digest(_shapes_dir(), ("unet.safetensors", "vae.safetensors", "sink.safetensors"))
        steps, guidance, batch = 20, 5.0, 32
    elif kind == "shapes-dit":
        if not dit_weights_present():
            raise ConfigurationError(
                f"--model shapes-dit: the transformer shapes model has no packaged weights yet (looked in {_shapes_dir()})"
            )
        from ..shapes import load_pipeline

        pipe = load_pipeline(device, backbone="dit")
        description = "the transformer shapes-world model (StableDiffusion3Pipeline, 32x32, packaged weights)"
        from ..shapes.dit_model import FILES

        identity = "shapes-dit:" + _digest(_shapes_dir(), tuple(FILES.values()))
        steps, guidance, batch = 20, 5.0, 32
    elif kind == "folder":
        pipe, dropped = _load_folder(pathlib.Path(spec), torch_dtype, keep_safety_checker)
        description = f"the diffusers pipeline in {spec}" + (" (its safety checker left out)" if dropped else "")
        identity = "folder:" + str(pathlib.Path(spec).resolve()) + ":" + _digest(pathlib.Path(spec), ("model_index.json",))
        if getattr(pipe, "safety_checker", None) is not None:
            identity += ":safety-checker"  # its black images are other images
    else:
        from ..detectors import import_object

        factory = import_object(spec)
        if not callable(factory):
            raise ConfigurationError(f"--model {spec}: a {type(factory).__name__} is not a function or class")
        pipe = factory()
        description = f"the pipeline from {spec}"
        identity = "factory:" + spec
    if kind != "folder" and dtype != "float32":
        pipe = pipe.to(dtype=torch_dtype)
    if kind in ("folder", "factory"):
        pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    family = _family(pipe, spec)
    return LoadedModel(pipe, spec, kind, description, f"{identity}:{device.split(':')[0]}:{dtype}", family,
                       steps, guidance, batch, device, dtype)


def _check_folder(folder: pathlib.Path) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ConfigurationError(
            f"--model {folder}: not a diffusers pipeline folder (no model_index.json; save one with "
            "pipe.save_pretrained(DIR))"
        )
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{index}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or "_class_name" not in meta:
        raise ConfigurationError(f"{index}: no '_class_name'; this is not a diffusers pipeline folder")


def _load_folder(folder: pathlib.Path, torch_dtype: Any, keep_safety_checker: bool) -> tuple[Any, bool]:
    import warnings

    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" is not ours to show
    meta = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    checker = meta.get("safety_checker")
    drop = not keep_safety_checker and isinstance(checker, list) and any(checker)
    extra: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False} if drop else {}
    try:
        with warnings.catch_warnings():
            # `torch_dtype` is deprecated for `dtype` in newer diffusers; older ones know only torch_dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, torch_dtype=torch_dtype, **extra
            )
    except Exception as exc:  # diffusers' errors vary by version; one line that names the folder
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigurationError(
            f"--model {folder}: cannot load the pipeline (local files, safetensors only): {type(exc).__name__}: {first}"
        ) from None
    return pipe, drop


def _family(pipe: Any, spec: str) -> str:
    from ..engine import family_for

    try:
        return family_for(pipe).name
    except UnsupportedPipelineError as exc:
        raise UnsupportedPipelineError(f"--model {spec}: {exc}") from None


def _digest(folder: pathlib.Path, names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in names:
        path = folder / name
        if path.is_file():
            h.update(name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]
