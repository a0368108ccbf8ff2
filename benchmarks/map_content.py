"""What a concept's map says about the concept, on the two-cell shapes models (issue 21;
docs/precision.md, "What the maps carry").

Every map rule of the engine (GIE's, calibrated, gated, contrast) decides where to inhibit from
the concept's map: the share of each pixel's attention on the concept's own tokens, the concept
encoded alone as the guard encodes it. Such a rule can spare the target's siblings only if the
target's map is larger where the target is drawn than where a sibling is, and can leave images
alone under a meaningless concept only if that word's map is smaller than a real target's.
This script measures both, on unguarded calls (observed, nothing inhibited).

For each backbone: placed two-thing prompts ("a red circle on the left and a blue dotted square on
the right", things and places drawn per seed), one image per seed; every attribute word of the
world and the meaningless `zqxv` ride along as concepts with the family's default sink (or
``--sink``); at one
denoising step (``--step``) each word's map is averaged over each cell (per site and head); the
detector labels each cell of the image with the attributes it shows. Per word:

- own: the map's mean over the cells that show the word's attribute (sites and heads averaged);
- sibling: its mean over the cells that show a sibling (another value of the same kind) and not it;
- ratio: own / sibling per site (heads averaged), the median over sites: 1 means the map cannot
  tell the word's attribute from its siblings';
- heads over 2: the share of (site, head) pairs whose own / sibling ratio exceeds 2;
- for `zqxv`: its mean over every cell, and that over the attribute words' mean "own".

    python benchmarks/map_content.py --backbone dit --seeds 0:48 --out DIR
    python benchmarks/map_content.py --backbone unet --seeds 0:48 --out DIR
    python benchmarks/map_content.py --sink prompt --seeds 0:48 --out DIR   # the prompt's keys compete
    python benchmarks/map_content.py --backbone unet --smoke --out DIR   # seconds (CI)

Writes DIR/results.json and DIR/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gie_guard import Guard  # noqa: E402
from gie_guard.engine.call import guarded_call  # noqa: E402
from gie_guard.shapes import load_detector, load_pipeline  # noqa: E402
from gie_guard.shapes import specificity as S  # noqa: E402
from gie_guard.shapes.detector import detect_cells  # noqa: E402
from gie_guard.shapes.world import ATTRIBUTES  # noqa: E402
from gie_guard.shapes.world_two import CELLS, HEIGHT, WIDTH  # noqa: E402

NULL_CONCEPT = "zqxv"
WORDS = (*ATTRIBUTES, NULL_CONCEPT)
GUIDANCE = 5.0
BATCH = 16


class CellMaps:
    """Observer: at one step, each word's map averaged over each cell, per site and head."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.by_site: dict[str, list[np.ndarray]] = {}  # site -> per call (rows, words, heads, cells)

    def on_maps(self, step: int, site: Any, shares: list[torch.Tensor]) -> None:
        if step != self.step:
            return
        per_word = []
        for share in shares:  # (rows, h, N), N = the site's latent grid, twice as wide as high
            rows, heads, n = share.shape
            side = int(round((n / 2) ** 0.5))
            grid = share.reshape(rows, heads, side, 2 * side)
            per_word.append(torch.stack([grid[..., :side].mean((-1, -2)), grid[..., side:].mean((-1, -2))], -1))
        self.by_site.setdefault(site.name, []).append(torch.stack(per_word, 1).numpy())

    def array(self) -> tuple[list[str], np.ndarray]:
        """(site names, (sites, images, words, heads, cells)); site order as first seen."""
        names = list(self.by_site)
        return names, np.stack([np.concatenate(self.by_site[s], 0) for s in names])


def word_rows(maps: np.ndarray, labels: Sequence[Sequence[set[str]]], words: Sequence[str]) -> list[dict[str, Any]]:
    """The per-word measures (module docstring) from ``maps`` (sites, images, words, heads, cells)
    and ``labels`` (per image, per cell, the attributes the detector found there)."""
    sites, images, _, heads, cells = maps.shape
    flat = maps.transpose(0, 2, 3, 1, 4).reshape(sites, len(words), heads, images * cells)  # cell = image-major
    found = [cell for image in labels for cell in image]
    out: list[dict[str, Any]] = []
    for w, word in enumerate(words):
        if word == NULL_CONCEPT:
            continue
        sib = set(S.siblings(word))
        own = np.array([word in f for f in found])
        other = np.array([bool(sib & f) and word not in f for f in found])
        row: dict[str, Any] = {"word": word, "kind": S.kind_of(word), "n_own": int(own.sum()), "n_sibling": int(other.sum())}
        if own.any() and other.any():
            m = flat[:, w]  # (sites, heads, cells)
            per_head = m[..., own].mean(-1) / np.maximum(m[..., other].mean(-1), 1e-12)  # (sites, heads)
            per_site = m.mean(1)[:, own].mean(-1) / np.maximum(m.mean(1)[:, other].mean(-1), 1e-12)
            row.update(own=float(m[..., own].mean()), sibling=float(m[..., other].mean()),
                       ratio=float(np.median(per_site)), ratio_by_site=[float(x) for x in per_site],
                       heads_over_2=float((per_head > 2).mean()))
        out.append(row)
    if NULL_CONCEPT in words:
        null = float(flat[:, list(words).index(NULL_CONCEPT)].mean())
        owns = [r["own"] for r in out if "own" in r]
        out.append({"word": NULL_CONCEPT, "kind": "null", "mean": null,
                    "over_targets": null / float(np.mean(owns)) if owns else float("nan")})
    return out


def measure(backbone: str, seeds: Sequence[int], step: int, steps: int, log: Any, sink: str | None = None) -> dict[str, Any]:
    pipe = load_pipeline(world="two", backbone=backbone)
    pipe.set_progress_bar_config(disable=True)
    detector = load_detector()
    policy = {"name": "map-content", "dedup_threshold": 0.0, "inhibit_steps": [0.0, 1.0],
              "concepts": [{"id": w, "text": w, "scale": 1.0} for w in WORDS]}
    plan = Guard(policy=policy, exclusive=False, sink=sink).plan_for(pipe)
    observer = CellMaps(step)
    labels: list[list[set[str]]] = []
    for lo in range(0, len(seeds), BATCH):
        part = list(seeds[lo:lo + BATCH])
        with guarded_call(pipe, plan, observers=[observer], inhibit=False):
            images = pipe(prompt=[S.placed_scene(s) for s in part], num_inference_steps=steps, guidance_scale=GUIDANCE,
                          generator=[torch.Generator().manual_seed(s) for s in part], output_type="np",
                          height=HEIGHT, width=WIDTH).images
        labels += [[cells[c] for c in CELLS] for cells in detect_cells(detector, np.round(images * 255).astype(np.uint8))]
        log(f"{backbone}: {len(labels)}/{len(seeds)} images")
    sites, maps = observer.array()
    assert maps.shape[1] == len(labels), (maps.shape, len(labels))  # one row per prompt (the conditional rows)
    return {"backbone": backbone, "sink": plan.sink, "step": step, "steps": steps, "images": len(labels),
            "sites": sites, "words": word_rows(maps, labels, WORDS)}


def markdown(result: dict[str, Any]) -> list[str]:
    lines = [f"## {result['backbone']} (sink {result['sink']}, step {result['step']} of {result['steps']}, "
             f"{result['images']} images)\n",
             "| word | kind | own | sibling | ratio own/sibling (median over sites) | (site, head) pairs over 2 | cells own / sibling |",
             "|---|---|---|---|---|---|---|"]
    for r in result["words"]:
        if r["kind"] == "null":
            continue
        if "own" not in r:
            lines.append(f"| {r['word']} | {r['kind']} | - | - | - | - | {r['n_own']} / {r['n_sibling']} |")
            continue
        lines.append(f"| {r['word']} | {r['kind']} | {r['own']:.4f} | {r['sibling']:.4f} | {r['ratio']:.2f} | "
                     f"{r['heads_over_2']:.2f} | {r['n_own']} / {r['n_sibling']} |")
    null = [r for r in result["words"] if r["kind"] == "null"]
    if null:
        lines.append(f"\n`{NULL_CONCEPT}`: mean map {null[0]['mean']:.4f} over every cell, "
                     f"{null[0]['over_targets']:.2f}x the attribute words' mean 'own'.\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="both", choices=("unet", "dit", "both"))
    parser.add_argument("--seeds", default="0:48")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step", type=int, default=10, help="the denoising step observed (0-based)")
    parser.add_argument("--sink", default=None, choices=("own", "prompt", "image"),
                        help="the maps' sink (default: the family's, as the guard would use)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="4 images, 4 steps, step 2: seconds (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.step = "0:4", 4, 2
    if not 0 <= args.step < args.steps:
        parser.error(f"--step {args.step} is not a step of a {args.steps}-step call")
    start, end = (int(x) for x in args.seeds.split(":"))
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    backbones = ("unet", "dit") if args.backbone == "both" else (args.backbone,)
    results = [measure(b, list(range(start, end)), args.step, args.steps, log, args.sink) for b in backbones]
    command = "python benchmarks/map_content.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"# What the concept maps carry (two-cell shapes models)\n",
          f"command: `{command}`; {time.strftime('%Y-%m-%d')}, {time.perf_counter() - t0:.0f} s\n"]
    for result in results:
        md += markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
