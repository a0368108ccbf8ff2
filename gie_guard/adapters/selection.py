"""Find the adapter for a ``scale: auto`` concept.

Adapters come from the folders and files the user names (in that order), then from the
adapters shipped with gie_guard (the top-level ``adapters/`` folder of a checkout, packaged
as ``gie_guard.shipped_adapters``). A concept gets the first adapter whose fingerprint
equals the pipeline's and whose categories include the concept's category; among those,
one trained on the concept's own text comes first, then the order above, then file name.
No candidate: the policy's ``on_missing_adapter`` decides (fallback scale, or an error).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ..errors import AdapterError
from .format import SUFFIX, AdapterHeader, load_adapter, read_header
from .model import Fingerprint, MLPAdapter

__all__ = ["AdapterLibrary", "AutoChoice", "shipped_adapter_dir"]

AdapterSource = Union[str, "os.PathLike[str]", MLPAdapter]


def shipped_adapter_dir() -> Path:
    """The folder of adapters shipped with gie_guard (installed wheel or source checkout)."""
    try:
        from importlib.resources import files

        return Path(str(files("gie_guard.shipped_adapters")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "adapters"


@dataclass(frozen=True, eq=False)
class AutoChoice:
    """How one auto concept gets its scale in calls on one pipeline: ``adapter`` predicts
    per token, clamped to ``[lo, hi]`` (the policy's range intersected with the adapter's);
    ``fallback`` replaces a NaN prediction."""

    concept_id: str
    adapter: MLPAdapter
    lo: float
    hi: float
    fallback: float

    @classmethod
    def make(cls, concept_id: str, adapter: MLPAdapter, *, policy_min: float, policy_max: float, fallback: float) -> AutoChoice:
        a_lo, a_hi = adapter.scale_range
        lo, hi = max(policy_min, a_lo), min(policy_max, a_hi)
        if lo > hi:  # disjoint ranges: the policy's bounds win
            lo, hi = policy_min, policy_max
        return cls(concept_id, adapter, lo, hi, fallback)


class _Entry:
    def __init__(self, order: int, header: AdapterHeader | None, adapter: MLPAdapter | None) -> None:
        self.order = order
        self.header = header
        self.adapter = adapter

    @property
    def fingerprint(self) -> Fingerprint:
        return self.adapter.fingerprint if self.adapter is not None else self.header.fingerprint  # type: ignore[union-attr]

    @property
    def categories(self) -> tuple[str, ...]:
        return self.adapter.categories if self.adapter is not None else self.header.categories  # type: ignore[union-attr]

    @property
    def concepts(self) -> tuple[str, ...]:
        return self.adapter.concepts if self.adapter is not None else self.header.concepts  # type: ignore[union-attr]

    @property
    def name(self) -> str:
        return self.adapter.name if self.adapter is not None else self.header.name  # type: ignore[union-attr]


class AdapterLibrary:
    """The adapters a Guard can choose from. ``sources``: folders (every ``*.safetensors``
    in them), adapter files, or :class:`MLPAdapter` objects. Files are read lazily, once;
    an unreadable file in a named place is an :class:`AdapterError` (fail closed)."""

    def __init__(self, sources: Iterable[AdapterSource] = (), *, include_shipped: bool = True) -> None:
        if isinstance(sources, (str, os.PathLike, MLPAdapter)):
            sources = [sources]  # one place, not the characters of a path
        self._sources = list(sources)
        self._include_shipped = include_shipped
        self._entries: list[_Entry] | None = None
        self._lock = threading.Lock()

    def _scan(self) -> list[_Entry]:
        with self._lock:
            if self._entries is not None:
                return self._entries
            entries: list[_Entry] = []
            places: list[Any] = list(self._sources)
            if self._include_shipped:
                places.append(("shipped", shipped_adapter_dir()))
            for order, place in enumerate(places):
                shipped = isinstance(place, tuple)
                if shipped:
                    place = place[1]
                if isinstance(place, MLPAdapter):
                    entries.append(_Entry(order, None, place))
                    continue
                path = Path(place)
                try:
                    mode: int | None = os.stat(path).st_mode
                except (OSError, ValueError):
                    mode = None
                if mode is not None and stat.S_ISDIR(mode):
                    # read_header refuses a FIFO or device named *.safetensors before opening it
                    for file in sorted(path.glob(f"*{SUFFIX}")):
                        entries.append(_Entry(order, read_header(file), None))
                elif mode is not None:
                    entries.append(_Entry(order, read_header(path), None))
                elif not shipped:
                    raise AdapterError("no such adapter file or folder", file=str(path))
            self._entries = entries
            return entries

    def available(self) -> list[str]:
        """Names of every adapter found, in search order."""
        return [e.name for e in self._scan()]

    def select(self, fingerprint: Fingerprint, category: str, text: str | None = None) -> MLPAdapter | None:
        """The adapter for a concept of ``category`` (and ``text``) on a pipeline with
        ``fingerprint``, or None."""
        candidates = [e for e in self._scan() if category in e.categories and e.fingerprint == fingerprint]
        if not candidates:
            return None
        best = min(candidates, key=lambda e: (0 if text is not None and text in e.concepts else 1, e.order, e.name))
        if best.adapter is None:
            with self._lock:
                if best.adapter is None:
                    best.adapter = load_adapter(best.header.path, fingerprint=fingerprint)  # type: ignore[union-attr]
        return best.adapter
