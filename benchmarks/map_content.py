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

``--quantity residual`` asks it of each layer's input (the residual stream, normed), against
what each word's value would write into it (through ``to_out``).

``--quantity output`` (UNet) asks the same of the attention *outputs* instead of the maps, as
``concept_map="output"`` reads them: at each cross-attention layer, whether a pixel's output
(before ``to_out``) is nearer, by dot product, the word's mean own-token value than every
sibling's. Per word: the share of pixels where it wins among its kind on the cells that show it
("own") and on the cells that show a sibling ("sibling"), averaged over layers, and the layer
where the difference is largest; for `zqxv`, the share of pixels where it beats every
attribute word.

    python benchmarks/map_content.py --backbone dit --seeds 0:48 --out DIR
    python benchmarks/map_content.py --backbone unet --seeds 0:48 --out DIR
    python benchmarks/map_content.py --sink prompt --seeds 0:48 --out DIR   # the prompt's keys compete
    python benchmarks/map_content.py --backbone unet --quantity output --seeds 0:48 --out DIR
    python benchmarks/map_content.py --backbone unet --smoke --out DIR   # seconds (CI)

Writes DIR/results.json and DIR/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import write_results  # noqa: E402
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


def _cell_means(x: torch.Tensor) -> torch.Tensor:
    """``(..., N)`` over a site's latent grid (twice as wide as high) -> ``(..., 2)``: the mean
    over the left cell and over the right cell."""
    side = int(round((x.shape[-1] / 2) ** 0.5))
    grid = x.reshape(*x.shape[:-1], side, 2 * side)
    return torch.stack([grid[..., :side].mean((-1, -2)), grid[..., side:].mean((-1, -2))], -1)


def _cells_of(word: str, found: Sequence[set[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Masks over ``found`` (per cell, its attributes): the cells that show ``word``, and the
    cells that show one of its siblings and not it."""
    sib = set(S.siblings(word))
    return (np.array([word in f for f in found]), np.array([bool(sib & f) and word not in f for f in found]))


def _words_plan(pipe: Any, sink: str | None = None) -> Any:
    """The plan of every word of WORDS as a concept (scale 1, never merged) for ``pipe``."""
    policy = {"name": "map-content", "dedup_threshold": 0.0, "inhibit_steps": [0.0, 1.0],
              "concepts": [{"id": w, "text": w, "scale": 1.0} for w in WORDS]}
    return Guard(policy=policy, exclusive=False, sink=sink).plan_for(pipe)


def _scene_labels(pipe: Any, seeds: Sequence[int], steps: int, log: Any, name: str,
                  around: Callable[[], contextlib.AbstractContextManager[dict[str, Any]]]) -> list[list[set[str]]]:
    """Generates the placed scenes of ``seeds`` in batches, each inside ``around()`` (which
    yields extra call arguments), and returns per image, per cell, what the detector finds."""
    detector = load_detector()
    labels: list[list[set[str]]] = []
    for lo in range(0, len(seeds), BATCH):
        part = list(seeds[lo:lo + BATCH])
        with around() as extra:
            images = pipe(prompt=[S.placed_scene(s) for s in part], num_inference_steps=steps, guidance_scale=GUIDANCE,
                          generator=[torch.Generator().manual_seed(s) for s in part], output_type="np",
                          height=HEIGHT, width=WIDTH, **extra).images
        labels += [[cells[c] for c in CELLS] for cells in detect_cells(detector, np.round(images * 255).astype(np.uint8))]
        log(f"{name}: {len(labels)}/{len(seeds)} images")
    return labels


class CellMaps:
    """Observer: at one step, each word's map averaged over each cell, per site and head."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.by_site: dict[str, list[np.ndarray]] = {}  # site -> per call (rows, words, heads, cells)

    def on_maps(self, step: int, site: Any, shares: list[torch.Tensor]) -> None:
        if step != self.step:
            return
        per_word = [_cell_means(share) for share in shares]  # each (rows, h, N) -> (rows, h, 2)
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
        own, other = _cells_of(word, found)
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


class CellOutputs:
    """Hooks on a UNet's cross-attention layers: at one step, per layer, each pixel's attention
    output (conditional rows) against each word's mean own-token value, per cell: the share of
    the cell's pixels where the word beats all others of its kind, and where `zqxv` beats every
    attribute word."""

    def __init__(self, pipe: Any, plan: Any, step: int, *, residual: bool = False) -> None:
        self.step, self.current = step, -1
        self.by_site: dict[str, list[np.ndarray]] = {}  # site -> per call (rows, words, cells)
        kinds = [S.KINDS[S.kind_of(w)] for w in ATTRIBUTES]
        self.rivals = [[WORDS.index(v) for v in kind] for kind in kinds]  # per attribute word: its kind
        self._handles = []
        for name in plan.site_names:
            attn = pipe.unet.get_submodule(name)
            with torch.no_grad():  # (W, h * d): each word's mean value over its own tokens
                values = torch.stack([attn.to_v(plan.embeddings[w, list(plan.token_positions[w])]).mean(0)
                                      for w in range(len(WORDS))])
            if residual:  # the layer's input against what each word's value would write into it
                values = values @ attn.to_out[0].weight.detach().T  # (W, query_dim)
            module = attn if residual else attn.to_out[0]
            self._handles.append(module.register_forward_pre_hook(self._hook(name, values)))

    def _hook(self, name: str, values: torch.Tensor) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            if self.current != self.step:
                return
            out = args[0][args[0].shape[0] // 2:]  # (rows, N, inner): the conditional half of the CFG batch
            scores = out @ values.T  # (rows, N, W): summed over heads and features
            wins = [(scores[..., w] >= scores[..., kind].amax(-1)).float() for w, kind in enumerate(self.rivals)]
            null = WORDS.index(NULL_CONCEPT)
            wins.append((scores[..., null] > scores[..., : len(ATTRIBUTES)].amax(-1)).float())
            self.by_site.setdefault(name, []).append(_cell_means(torch.stack(wins, 1)).numpy())  # (rows, W + 1, 2)
        return hook

    def on_step(self, _pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.current = step + 1  # the step about to run
        return kwargs

    @contextlib.contextmanager
    def call(self) -> Iterator[dict[str, Any]]:
        """Around one pipeline call: counts its steps from 0 (the call argument it needs)."""
        self.current = 0
        yield {"callback_on_step_end": self.on_step}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def output_rows(by_site: dict[str, np.ndarray], labels: Sequence[Sequence[set[str]]]) -> list[dict[str, Any]]:
    """Per attribute word, from ``by_site`` (site -> (images, words + null, cells) win shares)."""
    found = [cell for image in labels for cell in image]
    sites = list(by_site)
    out: list[dict[str, Any]] = []
    for w, word in enumerate(ATTRIBUTES):
        own, other = _cells_of(word, found)
        row: dict[str, Any] = {"word": word, "kind": S.kind_of(word), "n_own": int(own.sum()), "n_sibling": int(other.sum())}
        if own.any() and other.any():
            per = np.array([[by_site[s][:, w].reshape(-1)[own].mean(), by_site[s][:, w].reshape(-1)[other].mean()]
                            for s in sites])  # (sites, 2)
            best = int(np.argmax(per[:, 0] - per[:, 1]))
            row.update(own=float(per[:, 0].mean()), sibling=float(per[:, 1].mean()), best_site=sites[best],
                       best_own=float(per[best, 0]), best_sibling=float(per[best, 1]))
        out.append(row)
    null = float(np.mean([by_site[s][:, len(ATTRIBUTES)].mean() for s in sites]))
    out.append({"word": NULL_CONCEPT, "kind": "null", "beats_every_word": null})
    return out


def measure_outputs(seeds: Sequence[int], step: int, steps: int, log: Any, *, residual: bool = False) -> dict[str, Any]:
    pipe = load_pipeline(world="two", backbone="unet")
    pipe.set_progress_bar_config(disable=True)
    probe = CellOutputs(pipe, _words_plan(pipe), step, residual=residual)  # the plan: only the words' encodings
    try:
        labels = _scene_labels(pipe, seeds, steps, log, "unet outputs", probe.call)
    finally:
        probe.remove()
    by_site = {s: np.concatenate(parts, 0) for s, parts in probe.by_site.items()}
    return {"backbone": "unet", "quantity": "residual" if residual else "output", "step": step, "steps": steps, "images": len(labels),
            "sites": list(by_site), "words": output_rows(by_site, labels)}


def output_markdown(result: dict[str, Any]) -> list[str]:
    what = ("layer inputs (the residual stream) against values through to_out" if result["quantity"] == "residual"
            else "attention outputs against values")
    lines = [f"## unet, {what} (step {result['step']} of {result['steps']}, "
             f"{result['images']} images)\n",
             "| word | kind | wins among its kind: own cells | sibling cells | best layer | there: own / sibling | cells own / sibling |",
             "|---|---|---|---|---|---|---|"]
    for r in result["words"]:
        if r["kind"] == "null":
            lines.append(f"\n`{NULL_CONCEPT}` beats every attribute word on {r['beats_every_word']:.3f} of pixels.\n")
        elif "own" not in r:
            lines.append(f"| {r['word']} | {r['kind']} | - | - | - | - | {r['n_own']} / {r['n_sibling']} |")
        else:
            lines.append(f"| {r['word']} | {r['kind']} | {r['own']:.2f} | {r['sibling']:.2f} | {r['best_site']} | "
                         f"{r['best_own']:.2f} / {r['best_sibling']:.2f} | {r['n_own']} / {r['n_sibling']} |")
    return lines


def measure(backbone: str, seeds: Sequence[int], step: int, steps: int, log: Any, sink: str | None = None) -> dict[str, Any]:
    pipe = load_pipeline(world="two", backbone=backbone)
    pipe.set_progress_bar_config(disable=True)
    plan = _words_plan(pipe, sink)
    observer = CellMaps(step)

    @contextlib.contextmanager
    def observed() -> Iterator[dict[str, Any]]:
        with guarded_call(pipe, plan, observers=[observer], inhibit=False):
            yield {}

    labels = _scene_labels(pipe, seeds, steps, log, backbone, observed)
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
    parser.add_argument("--quantity", default="maps", choices=("maps", "output", "residual"),
                        help="maps: the concepts' maps (default); output: attention outputs against values (UNet); "
                             "residual: the layers' inputs against the values through to_out (UNet)")
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
    if args.quantity != "maps" and backbones != ("unet",):
        parser.error(f"--quantity {args.quantity} measures the UNet's cross-attention layers: use --backbone unet")
    if args.quantity != "maps":
        results = [measure_outputs(list(range(start, end)), args.step, args.steps, log,
                                   residual=args.quantity == "residual")]
    else:
        results = [measure(b, list(range(start, end)), args.step, args.steps, log, args.sink) for b in backbones]
    command = "python benchmarks/map_content.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"# What the concept maps carry (two-cell shapes models)\n",
          f"command: `{command}`; {time.strftime('%Y-%m-%d')}, {time.perf_counter() - t0:.0f} s\n"]
    for result in results:
        md += output_markdown(result) if result.get("quantity") in ("output", "residual") else markdown(result)
    write_results(args.out, results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
