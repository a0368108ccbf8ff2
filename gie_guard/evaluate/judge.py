"""Judging for ``gie-guard evaluate``: a :class:`gie_guard.detectors.Detector` labels every
image, and each policy concept is tied to the judge labels that mean it.

``--judge`` is any name ``gie_guard.detectors.create`` knows (``nudenet``, ``shapes``, a
registered name) or ``module:attribute``. A concept's labels, first rule that applies:

1. ``--label LABEL`` (repeatable): these labels for every concept;
2. the concept's own ``verify:`` when its verifier is the judge: its ``labels`` (default: the
   concept id), exactly as the verifiers read them;
3. ``nudenet``: ``nudity``, the one NudeNet label mapping of gie_guard
   (``gie_guard.detectors.nudenet.NUDENET_LABELS``, the verifiers' mapping);
4. ``shapes``: the shapes world's canonical attribute of the concept's text or an alias
   (``disc`` -> ``circle``);
5. otherwise: the concept id.

Judgments are cached in ``DIR/judgments.jsonl`` per image key and judge, so a rerun judges
only new images.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError

__all__ = ["ConceptLabels", "Judge"]


@dataclass(frozen=True)
class ConceptLabels:
    """A policy concept and the judge labels that mean it."""

    concept_id: str
    text: str
    labels: tuple[str, ...]
    rule: str  # which rule gave the labels


class Judge:
    def __init__(self, spec: str, *, labels: Sequence[str] = ()) -> None:
        from .. import detectors

        self.spec = spec
        self.override = tuple(labels)
        self.detector = detectors.create(spec)  # unknown names: ConfigurationError listing the known ones

    def concept_labels(self, snapshot: Any) -> list[ConceptLabels]:
        out = []
        for concept in snapshot.policy.concepts:
            if not concept.enabled:
                continue
            verify = getattr(concept, "verify", None)
            if self.override:
                out.append(ConceptLabels(concept.id, concept.text, self.override, "--label"))
            elif verify is not None and verify.verifier == self.spec:
                out.append(ConceptLabels(concept.id, concept.text, tuple(verify.labels) or (concept.id,), "verify"))
            elif self.spec == "nudenet":
                from ..detectors.nudenet import NUDENET_LABELS

                out.append(ConceptLabels(concept.id, concept.text, tuple(sorted(set(NUDENET_LABELS.values()))), "nudenet"))
            elif self.spec == "shapes":
                out.append(ConceptLabels(concept.id, concept.text, (_shapes_label(concept),), "shapes"))
            else:
                out.append(ConceptLabels(concept.id, concept.text, (concept.id,), "concept id"))
        if not out:
            raise ConfigurationError(f"policy {snapshot.name!r} has no enabled concepts to evaluate")
        return out

    def judge(self, root: pathlib.Path, images: dict[str, Callable[[], Any]], *, progress: bool = True,
              batch_size: int = 32) -> dict[str, frozenset[str]]:
        """Labels per image key; ``images`` maps keys to loaders of their (H, W, 3) uint8 arrays."""
        from tqdm.auto import tqdm

        from ..detectors import as_pil_images
        from ..verifiers import check_answer

        from .generate import read_records

        path = root / "judgments.jsonl"
        cached = {rec["key"]: frozenset(rec.get("labels", ())) for rec in read_records(path)
                  if rec.get("judge") == self.spec and rec["key"] in images}
        todo = [k for k in images if k not in cached]
        if todo:
            import numpy as np

            bar = tqdm(total=len(todo), unit="image", desc=f"judging ({self.spec})", disable=not progress, dynamic_ncols=True)
            try:
                with path.open("a", encoding="utf-8") as fh:
                    for start in range(0, len(todo), batch_size):
                        keys = todo[start : start + batch_size]
                        arrays = [images[k]() for k in keys]
                        pil = as_pil_images(np.stack(arrays)) if len({a.shape for a in arrays}) == 1 else as_pil_images(
                            [_pil(a) for a in arrays])
                        found = check_answer(f"judge {self.spec}", self.detector(pil), len(keys))
                        for k, labels in zip(keys, found):
                            cached[k] = labels
                            fh.write(json.dumps({"key": k, "judge": self.spec, "labels": sorted(labels)}) + "\n")
                        fh.flush()
                        os.fsync(fh.fileno())
                        bar.update(len(keys))
            finally:
                bar.close()
        return {k: cached[k] for k in images}


def _pil(array: Any) -> Any:
    from PIL import Image

    return Image.fromarray(array)


def _shapes_label(concept: Any) -> str:
    from ..detectors.shapes import canonical_word

    for text in (concept.text, *concept.aliases):
        for word in reversed(str(text).split()):  # "red circle" -> circle
            try:
                return canonical_word(word)
            except ConfigurationError:
                continue
    raise ConfigurationError(
        f"concept {concept.id!r} ({concept.text!r}) names no shapes-world attribute, so the shapes judge cannot "
        "judge it; pass --label LABEL"
    )
