"""Which rows of a denoiser batch carry the prompt.

Each row is compared with what the pipeline's ``encode_prompt`` returned in this call: a
row equal to a prompt row carries the prompt, one equal to a negative-prompt row does not,
and one equal to neither fails the call (so PAG's third chunk, ControlNet's guess mode and
true CFG need no special case).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NoReturn

import torch

from .families.base import Family

__all__ = ["PromptRows"]


class PromptRows:
    def __init__(self, family: Family, fail: Callable[[str], NoReturn]) -> None:
        self.family = family
        self.fail = fail
        self.thread = threading.get_ident()
        self.layouts: list[tuple[int, tuple[int, ...]]] = []  # (batch, prompt rows) seen
        self._prompt: list[torch.Tensor] = []
        self._negative: list[torch.Tensor] = []
        self._encode_calls = 0
        self._cache: dict[tuple[int, int, int], tuple[int, ...]] = {}

    def wrap_encode(self, encode: Callable[..., Any]) -> Callable[..., Any]:
        """``encode_prompt`` that also remembers what it returned in this call's thread."""

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            result = encode(*args, **kwargs)
            if threading.get_ident() == self.thread:
                prompt, negative = self.family.prompt_embeddings(result, self._encode_calls)
                self._encode_calls += 1
                if prompt is not None:
                    self._prompt.append(prompt)
                if negative is not None:
                    self._negative.append(negative)
            return result

        return encode_prompt

    def of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
        """The prompt rows of a denoiser (or ControlNet) call with these arguments."""
        text = self.family.denoiser_text(args, kwargs)
        if text is None:
            self.fail("its denoiser was called without text states")
        key = (id(text), text.data_ptr(), text._version)
        rows = self._cache.get(key)
        if rows is None:
            rows = self._cache[key] = self._match(text)
            layout = (int(text.shape[0]), rows)
            if layout not in self.layouts:
                self.layouts.append(layout)
        return rows

    def _match(self, text: torch.Tensor) -> tuple[int, ...]:
        if not self._prompt:
            self.fail("its prompt embeddings were not produced by its encode_prompt, so the rows that carry the "
                      "prompt cannot be identified")
        prompt = [p[i] for p in self._prompt for i in range(p.shape[0])]
        negative = [n[i] for n in self._negative for i in range(n.shape[0])]
        rows = []
        for r in range(text.shape[0]):
            row = text[r]
            if any(row.shape == p.shape and torch.equal(row, p.to(row.device, row.dtype)) for p in prompt):
                rows.append(r)
            elif not any(row.shape == n.shape and torch.equal(row, n.to(row.device, row.dtype)) for n in negative):
                self.fail(f"row {r} of a denoiser batch of {text.shape[0]} matches neither the prompt nor the "
                          "negative prompt, so the rows to guard cannot be identified")
        return tuple(rows)
