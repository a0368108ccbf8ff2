"""The shapes world: seeded 32x32 renders of coloured, styled shapes and their captions.

Every attribute has a canonical word (the key of the tables below), training synonyms and
held-out synonyms. Held-out words never appear in training captions; they test whether a
concept is understood through words the image model never saw with it. They were chosen
as natural synonyms, before training, with a linear probe on the frozen text encoder
(docs/shapes.md). No candidate for triangle, red, blue or yellow passed the probe;
pyramid, scarlet and azure are kept anyway, so the held-out figure is not cherry-picked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

# grids of pixel coordinates and the boolean masks drawn on them
_Grid = NDArray[np.float64]
_Mask = NDArray[np.bool_]

SIZE = 32

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple")
STYLES = ("plain", "striped", "dotted")
ATTRIBUTES = SHAPES + COLOURS + STYLES  # the detector's 13 outputs, in this order

# canonical word -> words used in training captions (the canonical word first)
TRAIN_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus"),
    "red": ("red", "crimson"),
    "green": ("green", "emerald"),
    "blue": ("blue", "navy"),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "plain": ("plain", "solid"),
    "striped": ("striped",),
    "dotted": ("dotted", "spotted"),
}
# canonical word -> words that never appear in training captions
HELD_OUT_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("disk",),
    "square": ("tile",),
    "triangle": ("pyramid",),
    "star": ("asterisk",),
    "cross": ("crucifix",),
    "red": ("scarlet",),
    "green": ("lime",),
    "blue": ("azure",),
    "purple": ("lavender",),
}
# style as a trailing phrase ("a red circle with stripes"); training only
STYLE_PHRASES = {"plain": (), "striped": ("with stripes",), "dotted": ("with dots", "with polka dots")}

RGB = {
    "red": (215, 35, 35),
    "green": (30, 160, 55),
    "blue": (35, 75, 220),
    "yellow": (240, 200, 20),
    "purple": (135, 45, 175),
}
BACKGROUND = (228, 228, 222)
_SUPER = 4  # supersampling factor: anti-aliased edges the autoencoder can reproduce


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    style: str

    def words(self) -> set[str]:
        return {self.shape, self.colour, self.style}


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]  # one or two, left to right

    def attributes(self) -> set[str]:
        return set().union(*(t.words() for t in self.things))


def label_vector(scene: Scene) -> np.ndarray:
    """Multi-hot (13,) float32 over ATTRIBUTES."""
    present = scene.attributes()
    return np.array([a in present for a in ATTRIBUTES], dtype=np.float32)


def sample_thing(rng: np.random.Generator) -> Thing:
    return Thing(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=COLOURS[rng.integers(len(COLOURS))],
        style=STYLES[rng.integers(len(STYLES))],
    )


def sample_scene(rng: np.random.Generator, p_two: float = 0.0) -> Scene:
    if rng.random() < p_two:
        a = sample_thing(rng)
        b = sample_thing(rng)
        while b == a:  # two identical things make a redundant caption
            b = sample_thing(rng)
        return Scene((a, b))
    return Scene((sample_thing(rng),))


def _polygon_mask(x: _Grid, y: _Grid, vx: _Grid, vy: _Grid) -> _Mask:
    """Even-odd point-in-polygon test on grids x, y for vertices (vx, vy)."""
    inside = np.zeros(x.shape, dtype=bool)
    j = len(vx) - 1
    for i in range(len(vx)):
        crosses = (vy[i] > y) != (vy[j] > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = (vx[j] - vx[i]) * (y - vy[i]) / (vy[j] - vy[i]) + vx[i]
        inside ^= crosses & (x < xint)
        j = i
    return inside


def _shape_mask(shape: str, x: _Grid, y: _Grid, r: float) -> _Mask:
    """Boolean mask of `shape` of radius r centred at 0 on coordinate grids x, y (y down)."""
    if shape == "circle":
        return x**2 + y**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.82 * r
    if shape == "cross":
        arm = 0.34 * r
        return ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    if shape == "triangle":
        ang = np.deg2rad([-90, 30, 150])
        return _polygon_mask(x, y, 1.1 * r * np.cos(ang), 1.1 * r * np.sin(ang) + 0.15 * r)
    if shape == "star":
        ang = np.deg2rad(-90 + 36 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, 1.12 * r, 0.47 * r)
        return _polygon_mask(x, y, rad * np.cos(ang), rad * np.sin(ang) + 0.08 * r)
    raise ValueError(f"unknown shape {shape!r}")


def _style_pattern(style: str, x: _Grid, y: _Grid, phase: float) -> _Mask:
    """Where the pattern shows the light colour, on absolute pixel grids x, y."""
    if style == "plain":
        return np.zeros(x.shape, dtype=bool)
    if style == "striped":  # horizontal stripes, 3 px on / 3 px off
        stripes: _Mask = np.floor((y + phase) / 3.0) % 2 == 1
        return stripes
    if style == "dotted":  # dots of radius 1.6 px on a 6 px grid, coarse enough for the autoencoder
        gx = (x + phase) % 6.0 - 3.0
        gy = (y + phase) % 6.0 - 3.0
        return gx**2 + gy**2 <= 1.6**2
    raise ValueError(f"unknown style {style!r}")


def background_tint(rng: np.random.Generator) -> np.ndarray:
    """The jittered background colour (3,) of one render."""
    return np.clip(np.array(BACKGROUND) + rng.integers(-8, 9), 0, 255)


def render(scene: Scene, rng: np.random.Generator, background: np.ndarray | None = None) -> np.ndarray:
    """(32, 32, 3) uint8 image; position, size, pattern phase and tints jitter with rng.
    ``background`` (3,) fixes the background colour (drawn from rng when None), so that
    the cells of a larger canvas share one background; an empty scene is background only."""
    n = SIZE * _SUPER
    # sub-pixel sample centres in image pixel units, (n, n)
    c = (np.arange(n) + 0.5) / _SUPER
    y, x = np.meshgrid(c, c, indexing="ij")
    bg = background_tint(rng) if background is None else background
    img = np.broadcast_to(bg.astype(np.float32), (n, n, 3)).copy()
    two = len(scene.things) == 2
    for k, thing in enumerate(scene.things):
        if two:
            r = rng.uniform(6.0, 7.0)
            cx = (8.5 if k == 0 else 23.5) + rng.uniform(-1.5, 1.5)
            cy = 16 + rng.uniform(-4, 4)
        else:
            r = rng.uniform(9.0, 12.0)
            cx = 16 + rng.uniform(-3, 3)
            cy = 16 + rng.uniform(-3, 3)
        mask = _shape_mask(thing.shape, x - cx, y - cy, r)
        fg = np.clip(np.array(RGB[thing.colour]) + rng.integers(-15, 16, size=3), 0, 255)
        light = 0.45 * fg + 0.55 * 255.0  # the pattern's light colour stays distinct from bg
        pattern = _style_pattern(thing.style, x, y, rng.uniform(0, 6))
        img[mask] = np.where(pattern[mask][:, None], light, fg)
    # box-filter the supersampled image down to 32x32
    img = img.reshape(SIZE, _SUPER, SIZE, _SUPER, 3).mean(axis=(1, 3))
    pixels: NDArray[np.uint8] = np.round(img).astype(np.uint8)
    return pixels


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[rng.integers(len(words))]


def _words(attr: str, held_out: bool) -> tuple[str, ...]:
    if held_out and attr in HELD_OUT_WORDS:
        return HELD_OUT_WORDS[attr]
    return TRAIN_WORDS[attr]


def describe_thing(
    thing: Thing,
    rng: np.random.Generator,
    held_out: bool = False,
    with_colour: bool = True,
) -> str:
    """Caption fragment like "a red striped circle"; held_out uses held-out synonyms."""
    shape = _pick(rng, _words(thing.shape, held_out))
    colour = _pick(rng, _words(thing.colour, held_out)) if with_colour else None
    style = thing.style
    # plain is the default look: often left unsaid
    say_style = style != "plain" or rng.random() < 0.5
    use_phrase = say_style and STYLE_PHRASES[style] and not held_out and rng.random() < 0.3
    words = [colour] if colour else []
    if say_style and not use_phrase:
        style_word = _pick(rng, _words(style, held_out))
        if words and rng.random() < 0.5:
            words.insert(0, style_word)
        else:
            words.append(style_word)
    words.append(shape)
    text = "a " + " ".join(words)
    if use_phrase:
        text += " " + _pick(rng, STYLE_PHRASES[style])
    return text


def describe(
    scene: Scene,
    rng: np.random.Generator,
    held_out: bool = False,
    p_no_colour: float = 0.0,
) -> str:
    """Caption of a scene; with p_no_colour a single thing's colour is left unsaid."""
    if len(scene.things) == 2:
        a, b = (describe_thing(t, rng, held_out) for t in scene.things)
        return f"{a} and {b}"
    with_colour = rng.random() >= p_no_colour
    text = describe_thing(scene.things[0], rng, held_out, with_colour)
    if rng.random() < 0.2:
        text = "a picture of " + text
    return text


def sample_batch(
    n: int, rng: np.random.Generator, p_two: float = 0.0, p_no_colour: float = 0.0
) -> tuple[np.ndarray, list[Scene], list[str]]:
    """n renders (n, 32, 32, 3) uint8 with their scenes and training captions."""
    scenes = [sample_scene(rng, p_two) for _ in range(n)]
    images = np.stack([render(s, rng) for s in scenes])
    captions = [describe(s, rng, p_no_colour=p_no_colour) for s in scenes]
    return images, scenes, captions
