"""A site's concepts stacked into padded tensors.

The inhibitor then runs over every concept of a site in a few chunked matrix products
(inhibition.act) instead of one small attention per concept: with a policy's 1,000
concepts that is 1,000 Python iterations per site and step otherwise, which on a small
denoiser cost 100 times the denoiser itself.

Only what the maths reads is kept: every concept's keys over all of its slots (its softmax
runs over them), but values only at its own tokens, the only slots with a scale.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["ConceptKeys", "own_columns", "stack_concepts", "stack_references"]


@dataclass(frozen=True)
class ConceptKeys:
    """The concepts as one attention call of one site sees them: C concepts, key columns
    padded to T, own tokens padded to n, competing anchor keys padded to A. Real columns come
    first; padded ones are masked."""

    keys: torch.Tensor  # (C, h, T, d), or per row (C, B, h, T, d)
    key_valid: torch.Tensor | None  # (C, T) bool; None: no padding
    own: torch.Tensor  # (C, n) long: the key column of each own token (padding: column 0)
    own_valid: torch.Tensor  # (C, n) bool
    own_slots: torch.Tensor  # (C, n) long: the plan slot of each own token (padding: 0)
    values: torch.Tensor  # (C, h, n, d) or (C, B, h, n, d): own tokens' values (``project``: without what anchors span)
    competing: torch.Tensor | None  # (C, h, A, d) or (C, B, h, A, d): anchors' keys in each softmax (``compete``)
    competing_valid: torch.Tensor | None  # (C, A) bool
    key_slots: torch.Tensor  # (C, T) long: the plan slot of each key column (padding: 0)

    @property
    def count(self) -> int:
        return int(self.keys.shape[0])

    @property
    def columns(self) -> int:
        return int(self.keys.shape[-2])

    def chunks(self, size: int) -> Iterator[ConceptKeys]:
        """Consecutive groups of at most ``size`` concepts (views, no copies)."""
        for a in range(0, self.count, size):
            part = slice(a, a + size)

            def cut(x: torch.Tensor | None) -> torch.Tensor | None:
                return None if x is None else x[part]

            yield ConceptKeys(
                keys=self.keys[part], key_valid=cut(self.key_valid), own=self.own[part], own_valid=self.own_valid[part],
                own_slots=self.own_slots[part], values=self.values[part], competing=cut(self.competing),
                competing_valid=cut(self.competing_valid), key_slots=self.key_slots[part],
            )


def own_columns(plan: Plan, slots: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per concept, the key columns that stand for its own tokens (not start, end, padding),
    in column order. Concepts that share one ``slots`` object share one lookup."""
    out: list[list[int]] = []
    last: Sequence[int] | None = None
    at: dict[int, int] = {}
    for c, s in enumerate(slots):
        if s is not last:
            at, last = {slot: i for i, slot in enumerate(s)}, s
        out.append(sorted(at[p] for p in plan.token_positions[c] if p in at))
    return out


def _pad_stack(tensors: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """``(..., L_i, d)`` tensors -> ``(len, ..., length, d)``, zeros after each one's L_i."""
    first = tensors[0]
    out = first.new_zeros(len(tensors), *first.shape[:-2], length, first.shape[-1])
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-2], :] = t
    return out


def _valid(lengths: Sequence[int], length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(length, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def stack_concepts(
    plan: Plan, keys: Sequence[torch.Tensor] | torch.Tensor, own_values: Sequence[torch.Tensor],
    slots: Sequence[Sequence[int]], competing: Sequence[torch.Tensor | None],
) -> ConceptKeys:
    """Stack per-concept keys ``(..., h, T_c, d)`` (the same leading shape for all: shared
    ``(h, ...)`` or per row ``(B, h, ...)``; or already one tensor ``(C, ..., T, d)`` when
    every concept has T columns, kept as it is), whose columns stand for plan ``slots``, the
    values at the concept's own columns ``(..., h, n_c, d)`` (in :func:`own_columns`' order),
    and each concept's competing anchor keys (None: none)."""
    own = own_columns(plan, slots)
    if [v.shape[-2] for v in own_values] != [len(o) for o in own]:
        raise ValueError("values must be given at each concept's own columns")
    return _stack(keys, own, own_values, slots, competing)


def stack_references(keys: Sequence[torch.Tensor], own: Sequence[Sequence[int]]) -> ConceptKeys:
    """Reference texts' keys and the columns of their own tokens, for their maps alone (no
    values, no plan slots)."""
    values = [k.new_zeros(*k.shape[:-2], len(o), k.shape[-1]) for k, o in zip(keys, own)]
    return _stack(keys, [list(o) for o in own], values, [range(k.shape[-2]) for k in keys], [None] * len(keys))


def _stack(
    keys: Sequence[torch.Tensor] | torch.Tensor, own: list[list[int]], own_values: Sequence[torch.Tensor],
    slots: Sequence[Sequence[int]], competing: Sequence[torch.Tensor | None],
) -> ConceptKeys:
    device = keys[0].device
    lengths = [int(k.shape[-2]) for k in keys]
    t = max(lengths)
    n = max(1, max(len(o) for o in own))
    own_index = torch.tensor([cols + [0] * (n - len(cols)) for cols in own], dtype=torch.long)
    own_slots = torch.tensor([[s[i] for i in cols] + [0] * (n - len(cols)) for s, cols in zip(slots, own)],
                             dtype=torch.long)
    key_slots = torch.tensor([list(s) + [0] * (t - len(s)) for s in slots], dtype=torch.long)
    anchors: torch.Tensor | None = None
    anchors_valid: torch.Tensor | None = None
    if any(a is not None and a.shape[-2] for a in competing):
        empty = keys[0][..., :0, :]
        rivals = [empty if a is None else a for a in competing]
        widths = [a.shape[-2] for a in rivals]
        anchors, anchors_valid = _pad_stack(rivals, max(widths)), _valid(widths, max(widths), device)
    return ConceptKeys(
        keys=keys if isinstance(keys, torch.Tensor) else _pad_stack(keys, t),  # a tensor: no copy of C x T keys
        key_valid=None if min(lengths) == t else _valid(lengths, t, device),
        own=own_index.to(device),
        own_valid=_valid([len(o) for o in own], n, device),
        own_slots=own_slots.to(device),
        values=_pad_stack(own_values, n),
        competing=anchors,
        competing_valid=anchors_valid,
        key_slots=key_slots.to(device),
    )
