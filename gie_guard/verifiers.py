"""Verifiers: an optional check of the output after generation.

A verifier is a :class:`gie_guard.detectors.Detector`: anything with one method::

    def __call__(self, images: list[PIL.Image.Image]) -> list[set[str]]   # labels per image

A policy concept opts in with ``verify: {verifier: NAME, labels: [...], action: ...}``. After
each guarded call the Guard runs each named verifier once on the output images; an image
whose detected labels meet a concept's ``labels`` (default: the concept id) is a *residual
detection* of that concept, and the concept's action applies:

- ``record``: count it (``gie_guard_residual_detections_total``) and return the images;
- ``blur``: replace each affected image by a strongly blurred copy (:func:`blur_image`);
- ``block``: raise :class:`~gie_guard.errors.ContentBlockedError` carrying the report and the
  detections; no image is returned. The strongest action over all hits wins.

Fails closed: a verifier that raises, or whose answer is anything but a ``list`` with one
``set``/``frozenset`` of ``str`` labels per image, fails the call with ``GuardedCallError``
(counted as ``error``). A string per image would otherwise be read as a set of characters
and block nothing.

Every Guard knows ``nudenet`` (:func:`default_verifiers`, built on first use). Others, the toy
``shapes`` detector included, are passed by the code that needs them:
``Guard(verifiers={"shapes": gie_guard.detectors.create("shapes")})``.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFilter

from . import detectors
from .detectors import Detector
from .errors import ContentBlockedError, GuardedCallError

if TYPE_CHECKING:
    from .policy import PolicySnapshot
    from .policy.schema import Verify

__all__ = [
    "ContentBlockedError",
    "Hit",
    "StaticVerifier",
    "Verification",
    "Verifier",
    "blur_image",
    "check_answer",
    "check_verifiers",
    "default_verifiers",
    "run_verifiers",
    "verify_settings",
]

log = logging.getLogger("gie_guard.verifiers")

_ACTION_RANK = {"record": 0, "blur": 1, "block": 2}

# A verifier is a detector; the name stays for the ``Guard(verifiers=...)`` vocabulary.
Verifier = Detector

# Old names, now in gie_guard.detectors (one NudeNet wrapper, one shapes wrapper).
_MOVED = {
    "NUDENET_LABELS": ("gie_guard.detectors.nudenet", "NUDENET_LABELS"),
    "NudeNetVerifier": ("gie_guard.detectors.nudenet", "NudeNetDetector"),
    "ShapesVerifier": ("gie_guard.detectors.shapes", "ShapesDetector"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module, attr = _MOVED[name]
        warnings.warn(f"gie_guard.verifiers.{name} is deprecated; use {module}.{attr}", DeprecationWarning, stacklevel=2)
        import importlib

        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Hit:
    """A concept a verifier still found: the indices of the images, and what was done."""

    concept_id: str
    verifier: str
    images: tuple[int, ...]
    action: str


@dataclass(frozen=True)
class Verification:
    """What the verifiers of one generation found. ``checked`` is images checked per concept."""

    hits: tuple[Hit, ...] = ()
    checked: Mapping[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def action(self) -> str | None:
        """The strongest action among the hits (``block`` > ``blur`` > ``record``), or None."""
        if not self.hits:
            return None
        return max((h.action for h in self.hits), key=_ACTION_RANK.__getitem__)

    @property
    def outcome(self) -> str:
        """The generation outcome for metrics: ok, recorded, blurred or blocked."""
        return {None: "ok", "record": "recorded", "blur": "blurred", "block": "blocked"}[self.action]


def verify_settings(snapshot: PolicySnapshot) -> dict[str, Verify]:
    """Policy concept id -> its ``verify`` settings, for enabled concepts that have them."""
    return {c.id: c.verify for c in snapshot.policy.concepts if c.enabled and c.verify is not None}


def check_verifiers(snapshot: PolicySnapshot, verifiers: Mapping[str, Verifier]) -> None:
    """Raise ``PolicyError`` if the policy asks a verifier ``verifiers`` does not name."""
    from .errors import PolicyError

    for concept_id, verify in verify_settings(snapshot).items():
        if verify.verifier not in verifiers:
            name = verify.verifier
            hint = (f"gie_guard.detectors has one of that name: pass Guard(verifiers={{{name!r}: "
                    f"gie_guard.detectors.create({name!r})}})") if name in detectors.names() else \
                "pass others as Guard(verifiers={name: verifier})"
            raise PolicyError(
                f"unknown verifier {name!r} (this guard knows: {', '.join(sorted(verifiers)) or 'none'}; {hint})",
                file=snapshot.source, place=f"concept {concept_id}.verify",
            )


def check_answer(name: str, found: Any, count: int) -> list[frozenset[str]]:
    """``found``, a verifier's answer for ``count`` images, as label sets; GuardedCallError
    (the output is withheld) unless it is a list of ``count`` sets or frozensets of str."""
    def wrong(what: str) -> GuardedCallError:
        return GuardedCallError(
            f"verifier {name!r} answered {what}; a verifier answers a list with one set of str labels per "
            "image, so the output is withheld"
        )

    if not isinstance(found, list):
        raise wrong(f"a {type(found).__name__}")
    if len(found) != count:
        raise GuardedCallError(f"verifier {name!r} answered for {len(found)} images, not {count}; the output is withheld")
    for i, labels in enumerate(found):
        if not isinstance(labels, (set, frozenset)):
            raise wrong(f"a {type(labels).__name__} for image {i}")
        odd = next((label for label in labels if not isinstance(label, str)), None)
        if odd is not None:
            raise wrong(f"a {type(odd).__name__} label ({odd!r}) for image {i}")
    return [frozenset(labels) for labels in found]


def blur_image(image: Image.Image, radius: float | None = None) -> Image.Image:
    """A Gaussian blur strong enough to hide content: radius 1/8 of the larger side (>= 2 px)."""
    r = radius if radius is not None else max(2.0, max(image.size) / 8)
    return image.filter(ImageFilter.GaussianBlur(r))


# -- output images --------------------------------------------------------------------------


def _to_pil(images: Any) -> list[Image.Image]:
    """A pipeline output's ``images`` (list of PIL, (N, H, W, 3) floats in [0, 1], or a
    tensor of the same layout) as PIL images."""
    if isinstance(images, list) and all(isinstance(im, Image.Image) for im in images):
        return images
    array = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images)
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise GuardedCallError(
            f"cannot verify output images of shape {tuple(array.shape)}; use output_type 'pil' or 'np'"
        )
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in array]


def _blurred_output(images: Any, indices: Iterable[int]) -> Any:
    """``images`` with the images at ``indices`` blurred, in the same form (list or array)."""
    indices = sorted(set(indices))
    pil = _to_pil(images)
    if isinstance(images, list):
        out = list(images)
        for i in indices:
            out[i] = blur_image(pil[i])
        return out
    is_tensor = hasattr(images, "detach")
    array = images.detach().cpu().numpy().copy() if is_tensor else np.array(images, copy=True)
    for i in indices:
        blurred = np.asarray(blur_image(pil[i]), dtype=np.float32)
        if array.dtype != np.uint8:
            blurred = blurred / 255.0
        array[i] = blurred.reshape(array[i].shape).astype(array.dtype)
    if is_tensor:
        import torch

        return torch.from_numpy(array).to(images.device)
    return array


def _replace_images(output: Any, images: Any) -> Any:
    if isinstance(output, tuple):  # return_dict=False: (images, nsfw flags)
        return (images, *output[1:])
    output.images = images
    return output


def _output_images(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output.images


def run_verifiers(
    snapshot: PolicySnapshot, output: Any, verifiers: Mapping[str, Verifier]
) -> tuple[Any, Verification | None]:
    """Check ``output`` as the snapshot's ``verify`` settings say; return the output (with
    blurred images where asked) and the verification, or None when no concept asks.
    Raises ``GuardedCallError`` if a named verifier is unknown or answers wrongly."""
    settings = verify_settings(snapshot)
    if not settings:
        return output, None
    started = time.perf_counter()
    images = _to_pil(_output_images(output))
    by_verifier: dict[str, list[str]] = {}
    for concept_id, verify in settings.items():
        by_verifier.setdefault(verify.verifier, []).append(concept_id)
    hits: list[Hit] = []
    checked: dict[str, int] = {}
    for name, concept_ids in by_verifier.items():
        verifier = verifiers.get(name)
        if verifier is None:
            raise GuardedCallError(
                f"policy {snapshot.name!r} asks verifier {name!r} (concepts {', '.join(concept_ids)}) but the Guard "
                f"has none of that name (known: {', '.join(sorted(verifiers)) or 'none'}); the output is withheld"
            )
        found = check_answer(name, verifier(images), len(images))
        for concept_id in concept_ids:
            verify = settings[concept_id]
            labels = frozenset(verify.labels or (concept_id,))
            checked[concept_id] = len(images)
            flagged = tuple(i for i, detected in enumerate(found) if labels & detected)
            if flagged:
                hits.append(Hit(concept_id, name, flagged, verify.action))
    verification = Verification(tuple(hits), checked, time.perf_counter() - started)
    if hits:
        log.warning(
            "residual detections in a %r generation: %s", snapshot.name,
            ", ".join(f"{h.concept_id} x{len(h.images)} ({h.action})" for h in hits),
        )
    blur = sorted({i for h in hits if h.action == "blur" for i in h.images})
    if blur and verification.action != "block":
        output = _replace_images(output, _blurred_output(_output_images(output), blur))
    return output, verification


def default_verifiers() -> dict[str, Verifier]:
    """The verifiers every Guard knows by name: ``nudenet`` (built on first use, one per
    process). The toy ``shapes`` detector is not one of them."""
    return {"nudenet": _Lazy("nudenet")}


class _Lazy:
    """``gie_guard.detectors.shared(name)``, looked up on the first call (loading a detector
    costs seconds, and a guard that never verifies should not pay it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._detector: Detector | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<detector {self.name!r}, loaded on first use>"

    def __call__(self, images: Sequence[Image.Image]) -> list[set[str]]:
        with self._lock:
            if self._detector is None:
                self._detector = detectors.shared(self.name)
        return self._detector(images)


class StaticVerifier:
    """Test double: answers ``labels(i)`` for the i-th image of each call, or the same set
    for every image; counts its calls."""

    def __init__(self, labels: Any = frozenset()) -> None:
        if isinstance(labels, str):
            from .errors import ConfigurationError

            raise ConfigurationError(f"StaticVerifier takes a set of labels, not the string {labels!r}")
        self._labels = labels
        self.calls = 0

    def __call__(self, images: Sequence[Image.Image]) -> list[set[str]]:
        self.calls += 1
        pick = self._labels if callable(self._labels) else (lambda _i: set(self._labels))
        return [set(pick(i)) for i in range(len(images))]
