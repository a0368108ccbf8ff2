"""Quality gate and attention locality of the two-cell world's model (world_two.py).

    python -m gie_guard.shapes.quality_two [--n 100] [--seed 1000] [--weights DIR] [--locality-n 12] [--backbone dit]

Quality, per thing at its place, judged cell by cell by the one-thing detector
(detector.detect_cells), on prompts of five forms:

- "one, placed":   "a red circle on the left": shape, colour, style in the named cell, other cell empty;
- "one, no place": "a red circle": the same in whichever cell is drawn, exactly one cell drawn;
- "two, left-right", "two, right-left": "A on the left and B on the right" and its reverse;
- "two, no place": "A and B", which says nothing of places (training names such pairs in
  random order): judged in whichever arrangement matches more attributes.

Locality: for each thing's words (colour, style, shape tokens), the cross-attention mass
(mean over heads and the 20 denoising steps, conditional row; on the transformer, image
queries' joint attention to the token, per block) on its own cell and on the
other cell, per cross-attention layer; the table gives mean own mass / mean other mass
over the tokens of `--locality-n` prompts per form. Cells are halves of the latent, so
this is also the ratio of mean attention per pixel. For "one, no place" prompts the own
cell is the one the model drew in.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .detector import Detector, detect_cells, empty_cells, load_detector
from .model import load_pipeline
from .quality import GUIDANCE, STEPS, prompt_for
from .train_two import MapRecorder, cell_masks, token_cells
from .world import COLOURS, SHAPES, STYLES, Thing
from .world_two import CELLS, HEIGHT, WIDTH, Caption, compose

FORMS = ("one, placed", "one, no place", "two, left-right", "two, right-left", "two, no place")
TARGET = {"quality": 0.90, "locality": 2.5}


def _thing(rng: np.random.Generator) -> Thing:
    return Thing(SHAPES[rng.integers(5)], COLOURS[rng.integers(5)], STYLES[rng.integers(3)])


def prompt_set(form: str, n: int, rng: np.random.Generator) -> list[tuple[Caption, dict[str, Thing | None]]]:
    """n prompts of one form with training words, and what each cell should hold (for
    "one, no place" the thing is listed under both cells: either may hold it)."""
    out = []
    for _ in range(n):
        a = _thing(rng)
        if form.startswith("one"):
            if form == "one, placed":
                cell = CELLS[rng.integers(2)]
                cap = compose([(cell, prompt_for(a, rng)), (None, f" on the {cell}")])
                out.append((cap, {c: a if c == cell else None for c in CELLS}))
            else:
                out.append((compose([("left", prompt_for(a, rng))]), {"left": a, "right": a}))
            continue
        b = _thing(rng)
        while b == a:
            b = _thing(rng)
        pa, pb = prompt_for(a, rng), prompt_for(b, rng)
        if form == "two, left-right":
            cap = compose([("left", pa), (None, " on the left and "), ("right", pb), (None, " on the right")])
        elif form == "two, right-left":
            cap = compose([("right", pb), (None, " on the right and "), ("left", pa), (None, " on the left")])
        elif form == "two, no place":
            cap = compose([("left", pa), (None, " and "), ("right", pb)])
        else:
            raise ValueError(f"unknown prompt form {form!r}")
        out.append((cap, {"left": a, "right": b}))
    return out


@torch.no_grad()
def generate(pipe: Any, prompts: list[str], seed: int, batch: int = 20) -> np.ndarray:
    """(N, 32, 64, 3) uint8; image i uses generator seed `seed + i`."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(seed + j) for j in range(i, min(i + batch, len(prompts)))]
        images = pipe(prompts[i : i + batch], num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=HEIGHT,
                      width=WIDTH, generator=gens, output_type="np").images
        out.append(np.round(images * 255).astype(np.uint8))
    return np.concatenate(out)


def arrangement(want: dict[str, Thing | None], found: dict[str, set[str]]) -> dict[str, Thing | None]:
    """`want` or its mirror image, whichever matches more of the attributes found per cell
    (for prompts that name no places)."""
    mirror = {"left": want["right"], "right": want["left"]}

    def hits(w: dict[str, Thing | None]) -> int:
        return sum(len(t.words() & found[c]) for c, t in w.items() if t is not None)

    return mirror if hits(mirror) > hits(want) else want


def judge(form: str, want: dict[str, Thing | None], found: dict[str, set[str]]) -> dict[str, list[bool]]:
    """Per attribute kind, one verdict per thing the prompt names; plus "layout": the
    right cells drawn (the other cell empty for one thing, both drawn for two)."""
    if form == "two, no place":
        want = arrangement(want, found)
    if form == "one, no place":
        drawn = [c for c in CELLS if found[c]]
        cell = drawn[0] if len(drawn) == 1 else ("left" if len(found["left"]) >= len(found["right"]) else "right")
        thing = want[cell]
        assert thing is not None
        one = {k: [getattr(thing, k) in found[cell]] for k in ("shape", "colour", "style")}
        one["layout"] = [len(drawn) == 1]
        return one
    verdicts: dict[str, list[bool]] = {k: [] for k in ("shape", "colour", "style")}
    for cell, thing in want.items():
        if thing is not None:
            for k in verdicts:
                verdicts[k].append(getattr(thing, k) in found[cell])
    verdicts["layout"] = [all(bool(found[c]) == (want[c] is not None) for c in CELLS)]
    return verdicts


def quality_two(pipe: Any, detector: Detector, n: int = 100, seed: int = 1000) -> dict[str, dict[str, float]]:
    """{form: {"shape"|"colour"|"style"|"all"|"layout": rate, "n": prompts}}; "all": every
    attribute of every named thing right at its place."""
    rows = {}
    for k, form in enumerate(FORMS):
        rng = np.random.default_rng(seed + k)
        prompts = prompt_set(form, n, rng)
        images = generate(pipe, [c.text for c, _ in prompts], seed + 10_000 * k)
        found = detect_cells(detector, images)
        per = [judge(form, want, f) for (_, want), f in zip(prompts, found)]
        row = {kind: float(np.mean([v for p in per for v in p[kind]])) for kind in ("shape", "colour", "style", "layout")}
        row["all"] = float(np.mean([all(v for kind in ("shape", "colour", "style") for v in p[kind]) for p in per]))
        row["n"] = float(n)
        rows[form] = row
    return rows


def _attn2_names(pipe: Any) -> list[str]:
    return [n for n in pipe.unet.attn_processors if n.endswith("attn2.processor")]


@torch.no_grad()
def record_maps(pipe: Any, prompt: str, seed: int) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Per cross-attention layer (UNet) or joint-attention block (transformer), by name:
    the conditional row's attention of image queries to text keys (N, T), mean over heads
    and the denoising steps; and the generated image (32, 64, 3) uint8. For the transformer,
    T is the CLIP slot (its positions are the tokenizer's) and the attention is the joint
    softmax's share over [image; text] keys."""
    if hasattr(pipe, "transformer"):
        return _record_joint(pipe, prompt, seed)
    recorders = {n: MapRecorder() for n in _attn2_names(pipe)}
    saved = pipe.unet.attn_processors
    pipe.unet.set_attn_processor({n: recorders.get(n, p) for n, p in saved.items()})
    try:
        image = _one_image(pipe, prompt, seed)
    finally:
        pipe.unet.set_attn_processor(saved)
    # each recorded map is (2, N, T): [unconditional, conditional] rows of classifier-free guidance
    maps = {n.removesuffix(".processor"): torch.stack([m[-1] for m in r.maps]).mean(0) for n, r in recorders.items()}
    return maps, image


def _one_image(pipe: Any, prompt: str, seed: int) -> np.ndarray:
    image = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=HEIGHT, width=WIDTH,
                 generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    pixels: np.ndarray = np.round(image * 255).astype(np.uint8)
    return pixels


def _record_joint(pipe: Any, prompt: str, seed: int) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    from .dit_attention import RecordingJointProcessor

    records: list[torch.Tensor] = []  # per block call, step-major: (S, S) of the conditional row
    saved = pipe.transformer.attn_processors
    pipe.transformer.set_attn_processor(RecordingJointProcessor(records))
    try:
        image = _one_image(pipe, prompt, seed)
    finally:
        pipe.transformer.set_attn_processor(saved)
    blocks = len(pipe.transformer.transformer_blocks)
    n = (HEIGHT // pipe.vae_scale_factor) * (WIDTH // pipe.vae_scale_factor)  # image tokens (patch size 1)
    t = pipe.tokenizer.model_max_length  # the CLIP slot comes first among the text keys
    maps = {f"block {b}": torch.stack(records[b::blocks]).mean(0)[:n, n : n + t] for b in range(blocks)}
    return maps, image


def _short(name: str) -> str:
    return name.removesuffix(".transformer_blocks.0.attn2")


def forward_order(names: list[str]) -> list[str]:
    """Layer names in the order the UNet calls them: down blocks, mid block, up blocks
    (transformer blocks "block 0".. keep their order)."""
    rank = {"down": 0, "mid": 1, "up": 2, "block 0": 3}
    return sorted(names, key=lambda n: (rank.get(n.split("_")[0], 3), n))


def caption_masses(pipe: Any, caption: Caption, seed: int = 0, cell_of_drawn: bool = False,
                   mirrored: Callable[[np.ndarray], bool] | None = None) -> tuple[dict[str, tuple[list[float], list[float]]], np.ndarray]:
    """Per layer, for each token of a named thing: its attention mass on its own cell and
    on the other cell (mean over heads and steps). With `cell_of_drawn` (a one-thing prompt
    with no place), the own cell is the one drawn in the generated image; an image with
    no cell or both cells drawn gives no tokens. `mirrored` (a function of the generated
    image, for two things with no places): True when the things were drawn the other way
    round from the caption's cells, which are then swapped."""
    maps, image = record_maps(pipe, caption.text, seed)
    cells = token_cells(pipe.tokenizer, [caption])[0]  # (T, 2)
    if mirrored is not None and mirrored(image):
        cells = cells.flip(-1)
    if cell_of_drawn:
        empty = empty_cells(image[None])
        drawn = [c for c in CELLS if not empty[c][0]]
        named = cells.sum(-1) > 0
        cells = torch.zeros_like(cells)
        if len(drawn) == 1:
            cells[named, CELLS.index(drawn[0])] = 1.0
    latent_hw = (HEIGHT // pipe.vae_scale_factor, WIDTH // pipe.vae_scale_factor)
    tokens = torch.nonzero(cells.sum(-1)).flatten()
    out: dict[str, tuple[list[float], list[float]]] = {}
    for name, m in maps.items():  # m: (N, T)
        mass = cell_masks(m.shape[0], latent_hw).T @ m  # (2, T): attention mass per cell
        own = (cells.T * mass).sum(0)  # (T,)
        other = (cells.flip(-1).T * mass).sum(0)
        out[_short(name)] = ([float(own[t]) for t in tokens], [float(other[t]) for t in tokens])
    return out, image


def _is_mirrored(detector: Detector, want: dict[str, Thing | None], image: np.ndarray) -> bool:
    """Whether `image` (32, 64, 3) shows `want`'s things the other way round."""
    return arrangement(want, detect_cells(detector, image[None])[0]) is not want


def locality(pipe: Any, n: int = 12, seed: int = 1000, detector: Detector | None = None,
             own: str = "named") -> dict[str, dict[str, float]]:
    """{form: {layer: own-cell / other-cell attention}} for every form: the thing tokens'
    mean mass on their own cell over their mean mass on the other cell, over n prompts
    (a ratio of means: a token with almost nothing on the other cell cannot dominate).

    own "named": a thing's own cell is the place its prompt names (prompts without places:
    where it was drawn); "drawn": where the generated image shows it (the detector decides
    which way round two things were drawn), which measures whether maps follow the objects
    whether or not the model followed the place words."""
    if own not in ("named", "drawn"):
        raise ValueError(f"own must be 'named' or 'drawn', not {own!r}")
    table = {}
    for k, form in enumerate(FORMS):
        rng = np.random.default_rng(seed + 100 + k)
        own_mass: dict[str, list[float]] = {}
        other_mass: dict[str, list[float]] = {}
        for i, (cap, want) in enumerate(prompt_set(form, n, rng)):
            mirrored = None
            if form.startswith("two") and (own == "drawn" or form == "two, no place"):
                # which way round the things were drawn decides their own cells
                mirrored = functools.partial(_is_mirrored, detector or load_detector(), want)
            masses, _ = caption_masses(pipe, cap, seed + 20_000 + 100 * k + i,
                                       cell_of_drawn=form == "one, no place" or (own == "drawn" and form.startswith("one")),
                                       mirrored=mirrored)
            for name, (o, x) in masses.items():
                own_mass.setdefault(name, []).extend(o)
                other_mass.setdefault(name, []).extend(x)
        table[form] = {
            name: float(np.mean(own_mass[name]) / np.mean(other_mass[name])) if own_mass[name] else float("nan")
            for name in forward_order(list(own_mass))
        }
    return table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="prompts per form for the quality gate")
    ap.add_argument("--locality-n", type=int, default=12, help="prompts per form for locality")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--weights", type=pathlib.Path, default=None, help="a training run's folder (default: weights/two/)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--own-cell", choices=("named", "drawn"), default="named",
                    help="locality's own cell: the place the prompt names, or where the thing was drawn")
    ap.add_argument("--backbone", choices=("unet", "dit"), default="unet")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(world="two", weights_dir=args.weights, backbone=args.backbone)
    if not args.skip_quality:
        detector = load_detector()
        print(f"quality per thing at its place ({STEPS} steps of {type(pipe.scheduler).__name__}, guidance {GUIDANCE}, "
              f"target {TARGET['quality']}):")
        print(f"{'form':18s} {'shape':>6s} {'colour':>6s} {'style':>6s} {'all':>6s} {'layout':>6s} {'n':>4s}")
        for form, row in quality_two(pipe, detector, args.n, args.seed).items():
            print(f"{form:18s} {row['shape']:6.3f} {row['colour']:6.3f} {row['style']:6.3f} {row['all']:6.3f} "
                  f"{row['layout']:6.3f} {int(row['n']):4d}", flush=True)
    table = locality(pipe, args.locality_n, args.seed, load_detector(), own=args.own_cell)
    print(f"\nlocality: own cell ({args.own_cell}) / other cell attention of a thing's tokens (mean over heads, "
          f"steps; target {TARGET['locality']}), {args.locality_n} prompts per form:")
    layers = list(next(iter(table.values())))
    print(f"{'layer':26s} " + " ".join(f"{f:>16s}" for f in FORMS))
    for name in layers:
        print(f"{name:26s} " + " ".join(f"{table[f][name]:16.2f}" for f in FORMS))


if __name__ == "__main__":
    main()
