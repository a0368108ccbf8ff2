"""Measurement helpers of the specificity benchmark (benchmarks/specificity.py) on the two-cell
shapes world (world_two.py): seeded prompts, and rates computed from what
``detector.detect_cells`` finds in each cell of an unguarded and a guarded image of the same
seed. Pure functions: no model is loaded here.

- removal: among seeds whose unguarded image shows an attribute (in either cell), the share
  whose guarded image shows it nowhere;
- other kept: in two-thing images, the cell that holds the other (non-target) thing in the
  unguarded image holds exactly the same attributes (shape, colour, style) in the guarded one;
- all kept: every cell of the guarded image holds exactly what it held unguarded (an empty
  cell stays empty).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .world import COLOURS, HELD_OUT_WORDS, SHAPES, STYLES, TRAIN_WORDS
from .world_two import CELLS

KINDS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}
Cells = dict[str, set[str]]  # detect_cells' answer for one canvas: cell -> attributes found there


def kind_of(attribute: str) -> str:
    """The kind ("shape", "colour", "style") of a canonical attribute word."""
    for kind, values in KINDS.items():
        if attribute in values:
            return kind
    raise ValueError(f"unknown attribute {attribute!r}; one of {', '.join(v for vs in KINDS.values() for v in vs)}")


def siblings(attribute: str) -> tuple[str, ...]:
    """The other values of the attribute's kind (circle -> square, triangle, star, cross)."""
    return tuple(v for v in KINDS[kind_of(attribute)] if v != attribute)


@dataclass(frozen=True)
class Words:
    """How prompts may name an attribute: its canonical word, its other training synonyms and
    its held-out synonyms (never in training captions), from world.py's tables."""

    attribute: str
    synonyms: tuple[str, ...]
    held_out: tuple[str, ...]

    @classmethod
    def of(cls, attribute: str) -> Words:
        kind_of(attribute)  # refuses unknown words
        return cls(attribute, tuple(w for w in TRAIN_WORDS[attribute] if w != attribute), HELD_OUT_WORDS.get(attribute, ()))

    def all(self) -> tuple[str, ...]:
        return (self.attribute, *self.synonyms, *self.held_out)


def _thing(rng: np.random.Generator, fixed: dict[str, str], avoid: set[str]) -> dict[str, str]:
    """kind -> attribute: ``fixed`` kinds as given, the others drawn, never one of ``avoid``."""
    out = {}
    for kind, values in KINDS.items():
        if kind in fixed:
            out[kind] = fixed[kind]
        else:
            allowed = [v for v in values if v not in avoid]
            out[kind] = allowed[int(rng.integers(len(allowed)))]
    return out


def phrase(thing: dict[str, str], words: dict[str, str] | None = None) -> str:
    """ "a red striped circle"; plain is left unsaid unless a word names it (as erasure.py's
    prompts do); ``words`` replaces a kind's canonical word by a synonym."""
    said = {**thing, **(words or {})}
    style = "" if thing["style"] == "plain" and "style" not in (words or {}) else said["style"] + " "
    return f"a {said['colour']} {style}{said['shape']}"


def single_prompt(word: str, attribute: str, seed: int) -> str:
    """One thing, no place: ``attribute`` said as ``word``, the other two kinds drawn from the seed."""
    kind = kind_of(attribute)
    thing = _thing(np.random.default_rng([1, seed]), {kind: attribute}, set())
    return phrase(thing, {kind: word})


def pair_things(target: str, other: str, seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """The two things of the seed's pair prompt: one with the target attribute (not the other),
    one with the other attribute (not the target)."""
    if target == other:
        raise ValueError("target and other must differ")
    rng = np.random.default_rng([2, seed])
    return (_thing(rng, {kind_of(target): target}, {other}), _thing(rng, {kind_of(other): other}, {target}))


def pair_prompt(target: str, other: str, seed: int, *, placed: bool = False) -> str:
    """ "a red circle and a blue square", no places; the order drawn from the seed, since the
    two-cell models learned place-less pairs in random order (world_two.py). ``placed``: "a red
    circle on the left and a blue square on the right", which thing goes left and which is
    named first drawn from the seed too."""
    if placed:
        return placed_pair(target, other, seed)
    a, b = pair_things(target, other, seed)
    first, second = (a, b) if np.random.default_rng([3, seed]).random() < 0.5 else (b, a)
    return f"{phrase(first)} and {phrase(second)}"


def unnamed_phrase(thing: dict[str, str], kind: str) -> str:
    """``thing``'s phrase without its ``kind``'s word: a shape becomes "thing" ("a red
    thing"), a colour or style is left unsaid ("a circle")."""
    if kind == "shape":
        return phrase(thing, {"shape": "thing"})
    said = [thing["colour"] if kind != "colour" else "", thing["style"] if kind != "style" and thing["style"] != "plain"
            else "", thing["shape"]]
    return " ".join(["a", *(word for word in said if word)])


def placed_pair(target: str, other: str, seed: int, *, name_target: bool = True) -> str:
    """:func:`pair_prompt` with places named (the same prompt for the same seed);
    ``name_target=False`` says the target's thing without the target's word
    ("a red thing on the left and a blue square on the right"): the prompt of an img2img call
    whose input holds the target."""
    a, b = pair_things(target, other, seed)
    text = {id(a): phrase(a) if name_target else unnamed_phrase(a, kind_of(target)), id(b): phrase(b)}
    first, second = (a, b) if np.random.default_rng([3, seed]).random() < 0.5 else (b, a)
    places = ("left", "right") if np.random.default_rng([5, seed]).random() < 0.5 else ("right", "left")
    return f"{text[id(first)]} on the {places[0]} and {text[id(second)]} on the {places[1]}"


def various_prompt(seed: int) -> str:
    """A prompt naming whatever the seed draws: one thing or two (different) things, no places."""
    rng = np.random.default_rng([4, seed])
    first = _thing(rng, {}, set())
    if rng.random() < 0.5:
        return phrase(first)
    second = first
    while second == first:
        second = _thing(rng, {}, set())
    return f"{phrase(first)} and {phrase(second)}"


def placed_scene(seed: int) -> str:
    """Two different things the seed draws, each at a named place ("a red circle on the left
    and a blue dotted square on the right")."""
    rng = np.random.default_rng([6, seed])
    first = _thing(rng, {}, set())
    second = first
    while second == first:
        second = _thing(rng, {}, set())
    places = ("left", "right") if rng.random() < 0.5 else ("right", "left")
    return f"{phrase(first)} on the {places[0]} and {phrase(second)} on the {places[1]}"


def shows(cells: Cells, attribute: str) -> bool:
    return any(attribute in found for found in cells.values())


def removal(before: Sequence[Cells], after: Sequence[Cells], attribute: str) -> tuple[float, int]:
    """(share of eligible images whose guarded image no longer shows ``attribute`` anywhere,
    eligible images = those whose unguarded image shows it); nan when none is eligible."""
    had = [i for i, cells in enumerate(before) if shows(cells, attribute)]
    gone = sum(not shows(after[i], attribute) for i in had)
    return (gone / len(had) if had else float("nan"), len(had))


def other_cell(cells: Cells, other: str, thing: dict[str, str], target: str) -> str | None:
    """The cell of an unguarded canvas that holds the other thing: it shows the ``other``
    attribute; ties go to the cell without the target, then to the cell that matches more of
    the prompted ``thing``'s attributes, then left. None when no cell shows it."""
    wanted = set(thing.values())
    candidates = [c for c in CELLS if other in cells[c]]
    if not candidates:
        return None
    return max(candidates, key=lambda c: (target not in cells[c], len(wanted & cells[c]), -CELLS.index(c)))


def other_kept(before: Sequence[Cells], after: Sequence[Cells], others: Sequence[dict[str, str]], other: str,
               target: str) -> tuple[float, int]:
    """(share of eligible pair images whose other thing keeps its cell and exactly its
    attributes there, eligible = the unguarded image shows the other attribute in some cell).
    ``others``: per image, the other thing as prompted (kind -> attribute)."""
    kept, eligible = 0, 0
    for cells_before, cells_after, thing in zip(before, after, others):
        cell = other_cell(cells_before, other, thing, target)
        if cell is None:
            continue
        eligible += 1
        kept += cells_after[cell] == cells_before[cell]
    return (kept / eligible if eligible else float("nan"), eligible)


def other_survives(before: Sequence[Cells], after: Sequence[Cells], others: Sequence[dict[str, str]], other: str,
                   target: str) -> tuple[tuple[float, int], tuple[float, int]]:
    """Looser than :func:`other_kept`, on the same eligible images, to tell how the other thing
    is lost: ((share whose guarded image still shows the other attribute in any cell, eligible),
    (share that still shows it in the same cell, eligible))."""
    anywhere, in_place, eligible = 0, 0, 0
    for cells_before, cells_after, thing in zip(before, after, others):
        cell = other_cell(cells_before, other, thing, target)
        if cell is None:
            continue
        eligible += 1
        anywhere += shows(cells_after, other)
        in_place += other in cells_after[cell]
    if not eligible:
        return (float("nan"), 0), (float("nan"), 0)
    return (anywhere / eligible, eligible), (in_place / eligible, eligible)


def attributes_kept(before: Sequence[Cells], after: Sequence[Cells]) -> float:
    """Share of the unguarded images' (cell, attribute) pairs that the guarded images keep:
    erasure.py's "attributes kept", per cell (nan when nothing was found)."""
    total = sum(len(b[c]) for b in before for c in CELLS)
    kept = sum(len(b[c] & a[c]) for b, a in zip(before, after) for c in CELLS)
    return kept / total if total else float("nan")


def all_kept(before: Sequence[Cells], after: Sequence[Cells]) -> tuple[float, int]:
    """(share of images whose every cell holds exactly the attributes it held unguarded, images)."""
    same = sum(all(b[c] == a[c] for c in CELLS) for b, a in zip(before, after))
    return (same / len(before) if before else float("nan"), len(before))


def pooled(rates: Sequence[tuple[float, int]]) -> tuple[float, int]:
    """Rates over disjoint eligible sets pooled into one (weighted by their counts)."""
    total = sum(n for _, n in rates)
    return (sum(r * n for r, n in rates if n) / total if total else float("nan"), total)
