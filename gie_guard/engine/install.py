"""Everything one call puts on a pipeline, and taking it off again in reverse order."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["Installation"]


class Installation:
    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._patched: list[tuple[Any, str]] = []

    def patch(self, obj: Any, name: str, value: Any) -> None:
        """Shadow ``obj.name`` with an instance attribute (removed again, so the class's shows)."""
        object.__setattr__(obj, name, value) if not isinstance(obj, torch.nn.Module) else setattr(obj, name, value)
        self._patched.append((obj, name))

    def hook(self, *handles: Any) -> None:
        """Hook handles (``torch.utils.hooks.RemovableHandle``) to remove."""
        self._handles.extend(handles)

    def remove(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        for obj, name in reversed(self._patched):
            with contextlib.suppress(AttributeError):
                object.__delattr__(obj, name)
        self._patched.clear()
