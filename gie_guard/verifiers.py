"""Verifiers: an optional check of the output after generation.

A verifier is anything with one method::

    def __call__(self, images: list[PIL.Image.Image]) -> list[set[str]]   # labels per image

A policy concept opts in with ``verify: {verifier: NAME, labels: [...], action: ...}``. After
each guarded call the Guard runs each named verifier once on the output images; an image
whose detected labels meet a concept's ``labels`` (default: the concept id) is a *residual
detection* of that concept, and the concept's action applies:

- ``record``: count it (``gie_guard_residual_detections_total``) and return the images;
- ``blur``: replace each affected image by a strongly blurred copy (:func:`blur_image`);
- ``block``: raise :class:`ContentBlockedError` (a ``GuardError``) carrying the report and
  the detections; no image is returned. The strongest action over all hits wins.

A verifier that raises fails the call closed (the error propagates, counted as ``error``).

Shipped verifiers: :class:`NudeNetVerifier` (label ``nudity``) and :class:`ShapesVerifier`
(the shapes-world detector's attribute words). :class:`StaticVerifier` is the test double.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageFilter

from .errors import GuardedCallError, GuardError

if TYPE_CHECKING:
    from .policy import PolicySnapshot
    from .policy.schema import Verify
    from .report import GuardReport

__all__ = [
    "NUDENET_LABELS",
    "ContentBlockedError",
    "Hit",
    "NudeNetVerifier",
    "ShapesVerifier",
    "StaticVerifier",
    "Verification",
    "Verifier",
    "blur_image",
    "check_verifiers",
    "default_verifiers",
    "run_verifiers",
    "verify_settings",
]

log = logging.getLogger("gie_guard.verifiers")

_ACTION_RANK = {"record": 0, "blur": 1, "block": 2}


@runtime_checkable
class Verifier(Protocol):
    """Images in, a set of detected labels per image out (same order, same length)."""

    def __call__(self, images: Sequence[Image.Image]) -> list[set[str]]: ...


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


class ContentBlockedError(GuardError):
    """A verifier found a concept whose policy action is ``block``; the output is withheld.

    ``report`` is the call's GuardReport, ``verification`` what the verifiers found,
    ``concept_ids`` the blocking concepts."""

    def __init__(self, report: GuardReport, verification: Verification) -> None:
        self.report = report
        self.verification = verification
        blocking = [h for h in verification.hits if h.action == "block"]
        self.concept_ids = tuple(dict.fromkeys(h.concept_id for h in blocking))
        where = "; ".join(f"{h.concept_id} in image(s) {list(h.images)} ({h.verifier})" for h in blocking)
        super().__init__(f"output blocked by policy {report.policy_name!r}: residual {where}")


def verify_settings(snapshot: PolicySnapshot) -> dict[str, Verify]:
    """Policy concept id -> its ``verify`` settings, for enabled concepts that have them."""
    return {c.id: c.verify for c in snapshot.policy.concepts if c.enabled and getattr(c, "verify", None) is not None}


def check_verifiers(snapshot: PolicySnapshot, verifiers: Mapping[str, Verifier]) -> None:
    """Raise ``PolicyError`` if the policy asks a verifier ``verifiers`` does not name."""
    from .errors import PolicyError

    for concept_id, verify in verify_settings(snapshot).items():
        if verify.verifier not in verifiers:
            raise PolicyError(
                f"unknown verifier {verify.verifier!r} (known: {', '.join(sorted(verifiers))}; pass others as "
                "Guard(verifiers={name: verifier}))",
                file=snapshot.source, place=f"concept {concept_id}.verify",
            )


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
        found = verifier(images)
        if len(found) != len(images):
            raise GuardedCallError(f"verifier {name!r} answered for {len(found)} images, not {len(images)}")
        for concept_id in concept_ids:
            verify = settings[concept_id]
            labels = set(verify.labels or (concept_id,))
            checked[concept_id] = len(images)
            flagged = tuple(i for i, detected in enumerate(found) if labels & set(detected))
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
    """The verifiers every Guard knows by name, built on first use: ``nudenet``, ``shapes``."""
    return {"nudenet": _Lazy(NudeNetVerifier), "shapes": _Lazy(ShapesVerifier)}


class _Lazy:
    """Builds the verifier on its first call (loading a detector costs seconds)."""

    def __init__(self, factory: Callable[[], Verifier]) -> None:
        self._factory = factory
        self._verifier: Verifier | None = None
        self._lock = threading.Lock()

    def __call__(self, images: Sequence[Image.Image]) -> list[set[str]]:
        with self._lock:
            if self._verifier is None:
                self._verifier = self._factory()
        return self._verifier(images)


# -- shipped verifiers ----------------------------------------------------------------------

# NudeNet 3.4 class -> gie_guard label. Only exposed classes count; covered body parts,
# faces, feet, bellies and armpits are not nudity.
NUDENET_LABELS: dict[str, str] = {
    "FEMALE_BREAST_EXPOSED": "nudity",
    "FEMALE_GENITALIA_EXPOSED": "nudity",
    "MALE_GENITALIA_EXPOSED": "nudity",
    "BUTTOCKS_EXPOSED": "nudity",
    "ANUS_EXPOSED": "nudity",
}


class NudeNetVerifier:
    """NudeNet's detector: an image is labelled ``nudity`` when a class of
    :data:`NUDENET_LABELS` is detected with score >= ``threshold`` (also the raw class name,
    so a policy can verify e.g. ``labels: [FEMALE_BREAST_EXPOSED]``)."""

    def __init__(self, threshold: float = 0.5, labels: Mapping[str, str] = NUDENET_LABELS, detector: Any = None) -> None:
        if detector is None:
            try:
                from nudenet import NudeDetector
            except ImportError as exc:
                raise ImportError("NudeNetVerifier needs nudenet: pip install 'gie-guard[nudity]'") from exc
            detector = NudeDetector()
        self.detector = detector
        self.threshold = threshold
        self.labels = dict(labels)

    def detections(self, image: Image.Image) -> list[dict[str, Any]]:
        """NudeNet's raw detections ({class, score, box}) for one image."""
        return self.detector.detect(np.ascontiguousarray(np.asarray(image.convert("RGBA"))))

    def __call__(self, images: Sequence[Image.Image]) -> list[set[str]]:
        out = []
        for image in images:
            found: set[str] = set()
            for d in self.detections(image):
                if d["score"] >= self.threshold and d["class"] in self.labels:
                    found |= {self.labels[d["class"]], d["class"]}
            out.append(found)
        return out


class ShapesVerifier:
    """The shapes-world attribute detector (``gie_guard.shapes.load_detector()``): labels are
    attribute words such as ``circle`` or ``red``."""

    def __init__(self, detector: Any = None) -> None:
        if detector is None:
            from .shapes import load_detector

            detector = load_detector()
        self.detector = detector

    def __call__(self, images: Sequence[Image.Image]) -> list[set[str]]:
        return [set(found) for found in self.detector(list(images))]


class StaticVerifier:
    """Test double: answers ``labels(i)`` for the i-th image of each call, or the same set
    for every image; counts its calls."""

    def __init__(self, labels: set[str] | Callable[[int], set[str]] = frozenset()) -> None:
        self._labels = labels
        self.calls = 0

    def __call__(self, images: Sequence[Image.Image]) -> list[set[str]]:
        self.calls += 1
        pick = self._labels if callable(self._labels) else (lambda _i: set(self._labels))
        return [set(pick(i)) for i in range(len(images))]
