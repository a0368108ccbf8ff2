"""Erasure benchmark on the shapes-world models, through the public Guard API.

What the paper measures, in miniature (its Table 2 for objects, its style and multi-concept
results), judged by the shapes-world detector:

- removal: for each erased target and each prompted word (the canonical word, its training
  synonyms, its held-out synonyms, and the other attributes of the same kind), the share of
  images whose prompted attribute is gone, among the seeds whose unguarded image has it.
  Target: >= 0.95 where the prompt names the target or a synonym, <= 0.05 elsewhere.
- preservation on prompts without the target: the share of the unguarded image's attributes
  that the guarded image keeps, and a Frechet distance between detector features (logits) of
  guarded and unguarded images; beside it a null-concept control (a meaningless concept
  erased at the same scale) as the floor of collateral any intervention causes.
- several concepts at once (two, four), a sweep of fixed scales and step windows, and the
  baselines on the same model and seeds: the negative prompt (SD+NEG) and Safe Latent
  Diffusion (diffusers' StableDiffusionPipelineSafe, the target as its safety concept).

    python benchmarks/erasure.py --targets circle,red,striped,star --seeds 0:20 --out out/erasure
    python benchmarks/erasure.py --backbone dit ...     # the transformer (SD3-style) shapes model

The baselines run where they exist: the negative prompt on both backbones, Safe Latent
Diffusion only on the UNet (diffusers has it for Stable Diffusion 1.x pipelines only).

Writes DIR/results.json (rows: method, target, prompt_word, prompt_attribute, removal_rate,
images, ...), DIR/results.md and DIR/grid.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from gie_guard import Guard
from gie_guard.shapes import load_detector, load_pipeline
from gie_guard.shapes.world import COLOURS, HELD_OUT_WORDS, SHAPES, STYLES, TRAIN_WORDS

STEPS = 20
GUIDANCE = 5.0
KINDS = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}
NULL_CONCEPT = "zqxv"
# Safe Latent Diffusion's "medium" setting, its warm-up rescaled from 50 to our 20 steps
SLD_SETTINGS = dict(sld_guidance_scale=1000, sld_warmup_steps=4, sld_threshold=0.01, sld_momentum_scale=0.3, sld_mom_beta=0.4)


def kind_of(attribute: str) -> str:
    return next(k for k, values in KINDS.items() if attribute in values)


@dataclasses.dataclass(frozen=True)
class Column:
    """Prompts that name ``attribute`` by ``word``; the other two attributes vary with the seed."""

    word: str
    attribute: str
    held_out: bool

    def attributes(self, seed: int) -> dict[str, str]:
        """kind -> canonical attribute of this prompt at ``seed``."""
        rng = np.random.default_rng(10_000 + seed)
        return {kind: self.attribute if self.attribute in values else values[rng.integers(len(values))]
                for kind, values in KINDS.items()}

    def prompt(self, seed: int) -> str:
        words = self.attributes(seed)
        own_kind = kind_of(self.attribute)
        words[own_kind] = self.word
        style = "" if words["style"] == "plain" and own_kind != "style" else words["style"] + " "
        return f"a {words['colour']} {style}{words['shape']}"


def columns_for(kind: str) -> list[Column]:
    cols = []
    for attribute in KINDS[kind]:
        cols += [Column(w, attribute, False) for w in TRAIN_WORDS[attribute]]
        cols += [Column(w, attribute, True) for w in HELD_OUT_WORDS.get(attribute, ())]
    return cols


class Bench:
    def __init__(self, seeds: range, out: pathlib.Path, backbone: str = "unet") -> None:
        self.backbone = backbone
        self.pipe = load_pipeline(backbone=backbone)
        self.pipe.set_progress_bar_config(disable=True)
        self.detector = load_detector()
        self.seeds = seeds
        self.out = out
        self.cache: dict[tuple[str, Column, tuple[int, ...]], np.ndarray] = {}  # -> images (S, 32, 32, 3)
        self._sld = None
        from prometheus_client import CollectorRegistry

        from gie_guard.metrics import GuardMetrics

        self.metrics = GuardMetrics(CollectorRegistry())  # the benchmark's own registry

    # -- generation ---------------------------------------------------------------------------
    def _generate(self, call: Callable, prompts: list[str], seeds: list[int], **extra) -> np.ndarray:
        out = []
        for i in range(0, len(prompts), 32):
            gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + 32]]
            images = call(prompt=prompts[i : i + 32], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          generator=gens, output_type="np", **{k: v[i : i + 32] if isinstance(v, list) else v for k, v in extra.items()}).images
            out.append(np.round(images * 255).astype(np.uint8))
        return np.concatenate(out)

    def images(self, method: str, columns: list[Column]) -> dict[Column, np.ndarray]:
        """Images of every column and seed under ``method``, cached: (S, 32, 32, 3) per column."""
        seeds = tuple(self.seeds)
        todo = [c for c in columns if (method, c, seeds) not in self.cache]
        if todo:
            images = self._run(method, [c.prompt(s) for c in todo for s in seeds], [s for _ in todo for s in seeds])
            for i, c in enumerate(todo):
                self.cache[(method, c, seeds)] = images[i * len(seeds) : (i + 1) * len(seeds)]
        return {c: self.cache[(method, c, seeds)] for c in columns}

    def _run(self, method: str, prompts: list[str], seeds: list[int]) -> np.ndarray:
        kind, _, arg = method.partition(":")
        if kind == "none":
            return self._generate(self.pipe, prompts, seeds)
        if kind == "neg":
            return self._generate(self.pipe, prompts, seeds, negative_prompt=[arg] * len(prompts))
        if kind == "sld":
            self.sld.safety_concept = arg
            return self._generate(self.sld, prompts, seeds, **SLD_SETTINGS)
        if kind == "gie":
            spec = json.loads(arg)
            guard = Guard(policy={
                "name": "bench",
                "inhibit_steps": spec["window"],
                "dedup_threshold": 0.0,
                "concepts": [{"id": f"c{i}", "text": t, "scale": spec["scale"]} for i, t in enumerate(spec["texts"])],
            }, metrics=self.metrics, **spec.get("engine", {}))
            return self._generate(lambda **kw: guard(self.pipe, **kw), prompts, seeds)
        raise ValueError(method)

    @property
    def sld(self):
        if self._sld is None:
            from diffusers import StableDiffusionPipelineSafe

            p = self.pipe
            self._sld = StableDiffusionPipelineSafe(
                vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet, scheduler=p.scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            self._sld.set_progress_bar_config(disable=True)
        return self._sld

    # -- measures -----------------------------------------------------------------------------
    def found(self, images: np.ndarray) -> list[set[str]]:
        return self.detector(images)

    def removal(self, method: str, columns: list[Column]) -> dict[Column, tuple[float, int]]:
        """Per column: share of images whose prompted attribute is gone, among seeds where the
        unguarded image has it; and how many such seeds there were."""
        plain, guarded = self.images("none", columns), self.images(method, columns)
        out = {}
        for c in columns:
            before, after = self.found(plain[c]), self.found(guarded[c])
            had = [i for i, f in enumerate(before) if c.attribute in f]
            gone = [i for i in had if c.attribute not in after[i]]
            out[c] = (len(gone) / len(had) if had else float("nan"), len(had))
        return out

    def preservation(self, method: str, columns: list[Column], exclude: set[str]) -> tuple[float, float, float]:
        """(share of the unguarded images' attributes kept, share of images with any attribute
        changed, Frechet distance of detector logits) over the images of ``columns`` whose
        prompt names none of ``exclude``."""
        plain, guarded = self.images("none", columns), self.images(method, columns)
        pick = [(c, i) for c in columns for i, seed in enumerate(self.seeds) if not exclude & set(c.attributes(seed).values())]
        a = np.stack([plain[c][i] for c, i in pick])
        b = np.stack([guarded[c][i] for c, i in pick])
        before, after = self.found(a), self.found(b)
        kept = sum(len(x & y) for x, y in zip(before, after)) / max(1, sum(len(x) for x in before))
        changed = float(np.mean([x != y for x, y in zip(before, after)]))
        return kept, changed, frechet(self.features(a), self.features(b))

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        from gie_guard.shapes.detector import _as_batch

        return self.detector.net(_as_batch(images)).numpy().astype(np.float64)


def frechet(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (as FID does)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root1 @ s2 @ root1)  # eigenvalues of (s1^1/2 s2 s1^1/2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


ENGINE: dict = {}  # extra Guard(...) engine settings for every GIE method (--sink, --text-states)


def gie(texts: list[str], scale: float, window: tuple[float, float]) -> str:
    return "gie:" + json.dumps({"texts": texts, "scale": scale, "window": list(window), "engine": ENGINE})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="circle,red,striped,star", help="comma-separated attribute words to erase")
    parser.add_argument("--seeds", default="0:20", help="START:END seeds per prompt word")
    parser.add_argument("--out", default="out/erasure", type=pathlib.Path)
    parser.add_argument("--scale", type=float, default=None, help="GIE scale for the main tables (default: best of the sweep)")
    parser.add_argument("--window", default="0,1", help="GIE step window for the main tables, START,END")
    parser.add_argument("--sweep-scales", default="2,5,10,20,40")
    parser.add_argument("--sweep-windows", default="0-0.5,0-0.8,0-1")
    parser.add_argument("--sweep-seeds", default="0:8", help="seeds for the scale/window sweep (fewer)")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--sweep-only", action="store_true", help="stop after the scale/window sweep")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (one is fastest on a shared 2-core machine)")
    parser.add_argument("--backbone", default="unet", choices=("unet", "dit"), help="which shapes model")
    parser.add_argument("--sink", default=None, help="Guard(sink=...) for every GIE run (default: the family's)")
    parser.add_argument("--text-states", default=None, choices=("ride-along", "static"),
                        help="Guard(text_states=...) for the transformer backbone")
    args = parser.parse_args(argv)
    if args.sink:
        ENGINE["sink"] = args.sink
    if args.text_states:
        ENGINE["text_states"] = args.text_states
    torch.set_num_threads(args.threads)
    start, end = (int(x) for x in args.seeds.split(":"))
    sweep_seeds = range(*(int(x) for x in args.sweep_seeds.split(":")))
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if not any(t in v for v in KINDS.values())]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(sum(KINDS.values(), ()))}")
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(range(start, end), args.out, args.backbone)
    window = tuple(float(x) for x in args.window.split(","))
    rows: list[dict] = []
    md: list[str] = [f"# Erasure on the shapes-world model ({args.backbone})\n\nseeds {start}:{end} per prompted word (sweep: {args.sweep_seeds}), "
                     f"{STEPS} DDIM steps, guidance {GUIDANCE}, command: `python benchmarks/erasure.py {' '.join(argv or sys.argv[1:])}`\n"]
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    # 1. sweep of fixed scales and windows: removal on the target's own words, collateral on the rest
    md.append("## Scale and window sweep\n\nremoval = on prompts naming the target (word and synonyms); "
              "changed = share of other prompts' images with any attribute changed; null = the same for "
              f"the meaningless concept {NULL_CONCEPT!r} at that scale and window.\n")
    md.append("| target | window | scale | removal | changed | null changed |\n|---|---|---|---|---|---|")
    best_scale: dict[str, float] = {}
    for target in targets:
        cols = columns_for(kind_of(target))
        own = [c for c in cols if c.attribute == target]
        other = [c for c in cols if c.attribute != target and not c.held_out]
        saved = bench.seeds
        bench.seeds = sweep_seeds
        candidates = []
        for w in args.sweep_windows.split(","):
            win = tuple(float(x) for x in w.split("-"))
            for s in (float(x) for x in args.sweep_scales.split(",")):
                removal = bench.removal(gie([target], s, win), own)
                rate = _pooled(removal)
                _, changed, _ = bench.preservation(gie([target], s, win), other, {target})
                _, null_changed, _ = bench.preservation(gie([NULL_CONCEPT], s, win), other, {target})
                md.append(f"| {target} | {win[0]:g}-{win[1]:g} | {s:g} | {rate:.2f} | {changed:.2f} | {null_changed:.2f} |")
                rows.append(dict(method="gie-sweep", target=target, prompt_word=target, prompt_attribute=target, scale=s,
                                 window=list(win), removal_rate=rate, images=sum(n for _, n in removal.values()),
                                 changed_other=changed, null_changed_other=null_changed))
                if win == window:
                    candidates.append((rate, -changed, s))
                log(f"sweep {target} {win} w={s}: removal {rate:.2f} changed {changed:.2f} null {null_changed:.2f}")
        bench.seeds = saved
        # the default: the smallest scale reaching the best removal within 0.05
        top = max(r for r, _, _ in candidates)
        best_scale[target] = args.scale or min(s for r, _, s in candidates if r >= top - 0.05)

    # 2. the paper's Table 2 analogue per target: removal by prompted word, GIE and baselines
    for target in [] if args.sweep_only else targets:
        cols = columns_for(kind_of(target))
        scale = best_scale[target]
        methods = {f"GIE w={scale:g}": gie([target], scale, window)}
        if not args.no_baselines:
            methods["SD+NEG"] = f"neg:{target}"
            if args.backbone == "unet":
                methods["SLD-medium"] = f"sld:{target}"
        md.append(f"\n## Erasing {target!r} ({kind_of(target)}s)\n\nremoval rate by prompted word "
                  "(held-out synonyms marked *); n = seeds whose unguarded image has the prompted attribute\n")
        md.append("| method | " + " | ".join(c.word + ("*" if c.held_out else "") for c in cols) + " |")
        md.append("|---|" + "---|" * len(cols))
        for label, method in methods.items():
            removal = bench.removal(method, cols)
            md.append(f"| {label} | " + " | ".join(f"{r:.2f} (n={n})" for r, n in removal.values()) + " |")
            for c, (r, n) in removal.items():
                rows.append(dict(method=label, target=target, prompt_word=c.word, prompt_attribute=c.attribute,
                                 held_out=c.held_out, removal_rate=r, images=n, scale=scale, window=list(window)))
            log(f"table {target} {label} done")
        # preservation on prompts that never name the target, with the null control
        others = [c for k in KINDS for c in columns_for(k) if not c.held_out and c.attribute != target]
        md.append("\n| method | attributes kept | any attribute changed | Frechet (detector logits) |\n|---|---|---|---|")
        for label, method in {**methods, f"null {NULL_CONCEPT!r} w={scale:g}": gie([NULL_CONCEPT], scale, window)}.items():
            kept, changed, fd = bench.preservation(method, others, {target})
            md.append(f"| {label} | {kept:.3f} | {changed:.3f} | {fd:.3f} |")
            rows.append(dict(method=label, target=target, prompt_word="(other kinds)", prompt_attribute=None,
                             removal_rate=None, images=len(others) * len(bench.seeds), kept=kept, changed=changed, frechet=fd))
        log(f"preservation {target} done")

    # 3. several concepts at once: a shape with a style (the paper's object + style), then four
    groups = []
    shapes = [t for t in targets if kind_of(t) == "shape"]
    styles = [t for t in targets if kind_of(t) == "style"]
    if shapes and styles:
        groups.append([shapes[0], styles[0]])
    if len(targets) >= 4:
        groups.append(targets[:4])
    if args.sweep_only:
        groups = []
    if groups:
        shown = sorted({t for g in groups for t in g}, key=targets.index)
        md.append("\n## Several concepts at once\n\nremoval on each target's own prompts; kept = attributes kept on "
                  "prompts naming none of the group\n")
        md.append("| concepts | " + " | ".join(f"removal {t}" for t in shown) + " | kept elsewhere |\n|---|" + "---|" * (len(shown) + 1))
        everything = [c for k in KINDS for c in columns_for(k) if not c.held_out]
        for group in groups:
            scale = max(best_scale[t] for t in group)
            method = gie(group, scale, window)
            rates = [_pooled(bench.removal(method, [c for c in everything if c.attribute == t])) if t in group else None
                     for t in shown]
            kept, _, _ = bench.preservation(method, [c for c in everything if c.attribute not in group], set(group))
            md.append(f"| {' + '.join(group)} (w={scale:g}) | " + " | ".join("-" if r is None else f"{r:.2f}" for r in rates)
                      + f" | {kept:.3f} |")
            for t, r in zip(shown, rates):
                if r is not None:
                    rows.append(dict(method=f"GIE x{len(group)}", target="+".join(group), prompt_word=t, prompt_attribute=t,
                                     removal_rate=r, images=None, kept_elsewhere=kept, scale=scale, window=list(window)))
            log(f"multi {group} done")

    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    if not args.sweep_only:
        grid(bench, targets, best_scale, window, args.out / "grid.png", baselines=not args.no_baselines,
             sld=args.backbone == "unet")
    print("\n".join(md))
    log(f"wrote {args.out}/results.json, results.md, grid.png")
    return 0


def _pooled(removal: dict[Column, tuple[float, int]]) -> float:
    """Removal over all columns together, weighted by their numbers of eligible seeds."""
    total = sum(n for _, n in removal.values())
    return sum(r * n for r, n in removal.values() if n) / total if total else float("nan")


def grid(bench: Bench, targets: list[str], scales: dict[str, float], window, path: pathlib.Path, baselines: bool,
         sld: bool = True) -> None:
    """Rows: a few prompts per target; columns: unguarded, GIE, SD+NEG, SLD (where it exists)."""
    tiles = []
    for target in targets:
        own = [c for c in columns_for(kind_of(target)) if c.attribute == target][:2]
        extra = ([f"neg:{target}"] + ([f"sld:{target}"] if sld else [])) if baselines else []
        methods = ["none", gie([target], scales[target], window)] + extra
        for c in own:
            tiles.append([bench.images(m, [c])[c][0] for m in methods])
    zoom, pad = 3, 2
    rows, cols = len(tiles), max(len(r) for r in tiles)
    canvas = Image.new("RGB", (cols * (32 * zoom + pad), rows * (32 * zoom + pad)), "white")
    for i, row in enumerate(tiles):
        for j, img in enumerate(row):
            canvas.paste(Image.fromarray(img).resize((32 * zoom, 32 * zoom), Image.NEAREST), (j * (32 * zoom + pad), i * (32 * zoom + pad)))
    canvas.save(path)


if __name__ == "__main__":
    raise SystemExit(main())
