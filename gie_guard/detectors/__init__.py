"""Detectors: images in, the set of labels found in each image out.

One protocol serves every use of a detector in gie_guard: verifiers (``verify:`` keys of a
policy, after generation) and judges (labelling adapter training data) are thin uses of it::

    class Detector(Protocol):
        def __call__(self, images: Sequence[PIL.Image.Image]) -> list[set[str]]: ...

The answer is a ``list`` with one ``set`` (or ``frozenset``) of ``str`` labels per image, in
the order of the images. gie_guard checks this and fails closed on anything else.

Detectors by name (a small registry; each is built on first use):

- ``nudenet``: :class:`gie_guard.detectors.nudenet.NudeNetDetector` (``pip install
  'gie-guard[nudity]'``), label ``nudity`` plus NudeNet's raw class names;
- ``shapes``: :class:`gie_guard.detectors.shapes.ShapesDetector`, the toy shapes-world
  detector (labels: attribute words such as ``circle`` or ``red``). It is never a default
  verifier: code that runs the shapes model passes it explicitly,
  ``Guard(verifiers={"shapes": create("shapes")})``.

``register(name, factory)`` adds more; ``create(name)`` builds one, ``shared(name)`` returns one
instance per process (detectors load models: seconds and memory), and both also accept
``"module:attribute"`` (a detector object, or a class or function called with no arguments).
Importing this package imports neither NudeNet nor torch nor the shapes world.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import ConfigurationError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

__all__ = [
    "Detector",
    "as_pil_images",
    "create",
    "import_object",
    "names",
    "register",
    "shared",
]


@runtime_checkable
class Detector(Protocol):
    """Images in, a set of detected labels per image out (same order, same length)."""

    def __call__(self, images: Sequence[Image.Image]) -> list[set[str]]: ...


# Built-in names resolve to import paths, so nothing is imported before a detector is asked for.
_BUILTIN: dict[str, str] = {
    "nudenet": "gie_guard.detectors.nudenet:NudeNetDetector",
    "shapes": "gie_guard.detectors.shapes:ShapesDetector",
}
_FACTORIES: dict[str, Callable[[], Detector]] = {}
_SHARED: dict[str, Detector] = {}
_LOCK = threading.RLock()
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def register(name: str, factory: Callable[[], Detector], *, replace: bool = False) -> None:
    """Make ``create(name)`` call ``factory()``. A name taken already is an error unless
    ``replace``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(f"a detector name is 1-64 of [A-Za-z0-9_.-], got {name!r}")
    if not callable(factory):
        raise ConfigurationError(f"detector {name!r}: the factory must be callable, got {type(factory).__name__}")
    with _LOCK:
        if not replace and (name in _FACTORIES or name in _BUILTIN):
            raise ConfigurationError(f"a detector named {name!r} is registered already (pass replace=True)")
        _FACTORIES[name] = factory
        _SHARED.pop(name, None)


def names() -> list[str]:
    """Every detector name ``create`` knows."""
    with _LOCK:
        return sorted({*_BUILTIN, *_FACTORIES})


def create(name: str) -> Detector:
    """A new detector: a registered name, or ``"module:attribute"``."""
    with _LOCK:
        factory = _FACTORIES.get(name)
    if factory is not None:
        return _checked(name, factory())
    if name in _BUILTIN:
        return _checked(name, import_object(_BUILTIN[name])())
    if ":" in name:
        obj = import_object(name)
        return _checked(name, obj() if isinstance(obj, type) else obj)
    raise ConfigurationError(f"unknown detector {name!r} (known: {', '.join(names())}; or give 'module:attribute')")


def shared(name: str) -> Detector:
    """One detector per name and process, built on first use (thread-safe)."""
    with _LOCK:
        found = _SHARED.get(name)
        if found is None:
            found = _SHARED[name] = create(name)
        return found


def _checked(name: str, detector: Any) -> Detector:
    if not isinstance(detector, Detector):  # a runtime-checkable protocol: callable
        raise ConfigurationError(f"detector {name!r} is a {type(detector).__name__}, which cannot be called on images")
    return detector


def import_object(spec: str) -> Any:
    """The object ``"package.module:attribute.path"`` names (the CLI's ``--judge``,
    ``--pipeline`` and detector specs). Anything else is a ConfigurationError."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigurationError(f"expected a known name or 'module:attribute', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {spec!r}: {exc}") from None
    except AttributeError as exc:
        raise ConfigurationError(f"cannot import {spec!r}: {exc}") from None
    return obj


def as_pil_images(images: Sequence[Image.Image] | np.ndarray) -> list[Image.Image]:
    """PIL images, or an ``(N, H, W, 3)`` uint8 array, as a list of RGB PIL images (what a
    :class:`Detector` is called with)."""
    from PIL import Image

    if isinstance(images, Image.Image):
        raise ConfigurationError("a detector takes a sequence of images, not one image")
    if all(isinstance(im, Image.Image) for im in images):
        return list(images)
    import numpy as np

    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ConfigurationError(f"expected PIL images or an (N, H, W, 3) uint8 array, got {array.shape} {array.dtype}")
    return [Image.fromarray(a) for a in array]
