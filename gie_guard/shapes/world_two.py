"""The two-cell shapes world: a 64x32 canvas of two 32x32 cells ("left", "right"), each
empty or holding one thing of today's world (world.py), drawn exactly as a one-thing
render (radius 9-12 px, ±3 px jitter) on one shared background. Today's detector judges
each cell unchanged (detector.detect_cells).

Captions name places so the model has to bind each phrase to its cell:

- two things (share ``p_two``): "A on the left and B on the right", the same in the other
  order ("B on the right and A on the left"), or "A and B" with no places, naming the two
  in random order (places unspecified: neither order nor words tell where each goes);
- one thing (the rest): "A on the left" / "A on the right", or "A" alone (then the thing
  is in either cell, at random), so one-thing prompts stay in distribution; the other
  cell is empty.

Why random order without places: a first run named the left thing first in every
place-less caption, so "first named = left" held for 70 % of two-thing captions; by 500
steps the UNet had learned that shortcut instead of the place words (a "B on the right
and A on the left" prompt drew them swapped; docs/shapes.md).

Every caption comes with the character span of each thing's words (its phrase without
the leading "a") and of each place word ("left", "right"), so training can ground those
tokens to their cell (train_two.py) and measurements know which tokens belong where
(quality_two.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import SIZE, Scene, Thing, background_tint, describe_thing, render, sample_thing

CELLS = ("left", "right")
HEIGHT, WIDTH = SIZE, 2 * SIZE  # the canvas: 32 rows, 64 columns
P_TWO = 0.5  # share of scenes with a thing in each cell
# caption forms of a two-thing scene: places left-right, right-left, none (random order)
TWO_FORMS = {"left-right": 0.35, "right-left": 0.35, "no-place": 0.3}
P_SINGLE_PLACE = 0.7  # share of one-thing captions that say where the thing is


@dataclass(frozen=True)
class TwoScene:
    left: Thing | None
    right: Thing | None

    def cells(self) -> dict[str, Thing | None]:
        return {"left": self.left, "right": self.right}

    def things(self) -> list[tuple[str, Thing]]:
        """(cell, thing) for the occupied cells, left first."""
        return [(c, t) for c, t in self.cells().items() if t is not None]


@dataclass(frozen=True)
class Caption:
    text: str
    # per thing named: (cell, start, end), the characters of its words in `text`
    spans: tuple[tuple[str, int, int], ...]
    # per place word ("left", "right"): (cell, start, end) in `text`
    places: tuple[tuple[str, int, int], ...] = ()


def sample_two_scene(rng: np.random.Generator, p_two: float = P_TWO) -> TwoScene:
    if rng.random() < p_two:
        a = sample_thing(rng)
        b = sample_thing(rng)
        while b == a:  # two identical things would make "which is which" meaningless
            b = sample_thing(rng)
        return TwoScene(a, b)
    thing = sample_thing(rng)
    return TwoScene(thing, None) if rng.random() < 0.5 else TwoScene(None, thing)


def render_two(scene: TwoScene, rng: np.random.Generator) -> np.ndarray:
    """(32, 64, 3) uint8: the left cell's render beside the right cell's, one background."""
    bg = background_tint(rng)
    cells = [render(Scene(() if t is None else (t,)), rng, background=bg) for t in (scene.left, scene.right)]
    return np.concatenate(cells, axis=1)


def compose(parts: list[tuple[str | None, str]]) -> Caption:
    """Join (cell or None, text) pieces; a cell's piece is a thing phrase "a ...", whose
    span skips the article; in the other pieces "on the left"/"on the right" mark places."""
    text, spans, places = "", [], []
    for cell, piece in parts:
        if cell is not None:
            start = len(text) + (2 if piece.startswith("a ") else 0)
            spans.append((cell, start, len(text) + len(piece)))
        else:
            for place in CELLS:
                at = piece.find(f"on the {place}")
                if at >= 0:
                    start = len(text) + at + len("on the ")
                    places.append((place, start, start + len(place)))
        text += piece
    return Caption(text, tuple(spans), tuple(places))


def caption_for(
    scene: TwoScene, rng: np.random.Generator, form: str | None = None, held_out: bool = False
) -> Caption:
    """A caption of `scene`; `form` fixes a two-thing scene's form (TWO_FORMS) or, for one
    thing, "place" / "no-place"; None draws it."""
    things = scene.things()
    if len(things) == 2:
        if form is None:
            form = str(rng.choice(list(TWO_FORMS), p=list(TWO_FORMS.values())))
        (ca, a), (cb, b) = things
        pa, pb = describe_thing(a, rng, held_out), describe_thing(b, rng, held_out)
        if form == "left-right":
            return compose([(ca, pa), (None, " on the left and "), (cb, pb), (None, " on the right")])
        if form == "right-left":
            return compose([(cb, pb), (None, " on the right and "), (ca, pa), (None, " on the left")])
        if form == "no-place":  # random order: it says nothing of places
            first, second = ((ca, pa), (cb, pb)) if rng.random() < 0.5 else ((cb, pb), (ca, pa))
            return compose([first, (None, " and "), second])
        raise ValueError(f"unknown two-thing caption form {form!r}")
    if len(things) != 1:
        raise ValueError("a caption needs at least one thing")
    (cell, thing), = things
    if form is None:
        form = "place" if rng.random() < P_SINGLE_PLACE else "no-place"
    phrase = describe_thing(thing, rng, held_out)
    if form == "place":
        return compose([(cell, phrase), (None, f" on the {cell}")])
    if form == "no-place":
        return compose([(cell, phrase)])
    raise ValueError(f"unknown one-thing caption form {form!r}")


def sample_two_batch(
    n: int, rng: np.random.Generator, p_two: float = P_TWO
) -> tuple[np.ndarray, list[TwoScene], list[Caption]]:
    """n canvases (n, 32, 64, 3) uint8 with their scenes and training captions."""
    scenes = [sample_two_scene(rng, p_two) for _ in range(n)]
    images = np.stack([render_two(s, rng) for s in scenes])
    return images, scenes, [caption_for(s, rng) for s in scenes]


def split_cells(images: np.ndarray) -> dict[str, np.ndarray]:
    """(N, 32, 64, 3) canvases -> {"left": (N, 32, 32, 3), "right": (N, 32, 32, 3)}."""
    if images.ndim != 4 or images.shape[1:3] != (HEIGHT, WIDTH):
        raise ValueError(f"expected (N, {HEIGHT}, {WIDTH}, 3) canvases, got {images.shape}")
    return {"left": images[:, :, :SIZE], "right": images[:, :, SIZE:]}
