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
    def __init__(self, seeds: range, out: pathlib.Path, backbone: str = "unet", variant: str | None = None,
                 weights: pathlib.Path | None = None) -> None:
        self.backbone = backbone
        self.pipe = load_pipeline(backbone=backbone, weights_dir=weights, variant=variant)
        self.pipe.set_progress_bar_config(disable=True)
        self.detector = load_detector()
        self.seeds = seeds
        self.out = out
        self.cache: dict[tuple[str, Column, tuple[int, ...]], np.ndarray] = {}  # -> images (S, 32, 32, 3)
        # gated GIE runs: each image's measured presence per concept (report.concepts[i].presence)
        self.presence: dict[tuple[str, Column, tuple[int, ...]], np.ndarray] = {}  # -> (S, C)
        self._last_presence: np.ndarray | None = None
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
        for c in columns:  # a longer run of seeds starting with these already holds them
            longer = next((k for k in self.cache if k[0] == method and k[1] == c and len(k[2]) > len(seeds)
                           and k[2][: len(seeds)] == seeds), None) if (method, c, seeds) not in self.cache else None
            if longer is not None:
                self.cache[(method, c, seeds)] = self.cache[longer][: len(seeds)]
                if longer in self.presence:
                    self.presence[(method, c, seeds)] = self.presence[longer][: len(seeds)]
        todo = [c for c in columns if (method, c, seeds) not in self.cache]
        if todo:
            self._last_presence = None
            images = self._run(method, [c.prompt(s) for c in todo for s in seeds], [s for _ in todo for s in seeds])
            for i, c in enumerate(todo):
                self.cache[(method, c, seeds)] = images[i * len(seeds) : (i + 1) * len(seeds)]
                if self._last_presence is not None:
                    self.presence[(method, c, seeds)] = self._last_presence[i * len(seeds) : (i + 1) * len(seeds)]
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
            concepts = [{"id": f"c{i}", "text": t, "scale": spec["scale"]} for i, t in enumerate(spec["texts"])]
            policy = {"name": "bench", "inhibit_steps": spec["window"], "dedup_threshold": 0.0, "concepts": concepts}
            if spec.get("preserve"):  # preservation anchors on every concept, by the named mechanism
                for concept in concepts:
                    concept["preserve"] = spec["preserve"]
                policy["preserve_by"] = spec["preserve_by"]
            if spec.get("gate"):
                mode, threshold = spec["gate"]
                policy["presence"] = {"mode": mode, "threshold": threshold}
            guard = Guard(policy=policy, metrics=self.metrics, **spec.get("engine", {}))
            measured: list[np.ndarray] = []

            def call(**kw):
                out = guard(self.pipe, **kw)
                if spec.get("gate"):  # (images, C): what the gate saw in each image
                    measured.append(np.array([c.presence for c in guard.last_report.concepts], dtype=np.float64).T)
                return out

            images = self._generate(call, prompts, seeds)
            self._last_presence = np.concatenate(measured) if measured else None
            return images
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


def gie(texts: list[str], scale: float, window: tuple[float, float], preserve: list[str] | tuple[str, ...] = (),
        preserve_by: str | None = None, gate: tuple[str, float] | None = None) -> str:
    """A GIE method key: ``texts`` erased at ``scale`` in ``window``; optionally with preservation
    anchors (spared by ``preserve_by``) and presence gating (``(mode, threshold)``)."""
    spec: dict = {"texts": texts, "scale": scale, "window": list(window), "engine": ENGINE}
    if preserve:
        spec.update(preserve=list(preserve), preserve_by=preserve_by or "compete")
    if gate:
        spec["gate"] = list(gate)
    return "gie:" + json.dumps(spec)


WORD_ATTRIBUTE = {w: a for table in (TRAIN_WORDS, HELD_OUT_WORDS) for a, words in table.items() for w in words}


def parse_preserve(text: str | None, targets: list[str]) -> dict[str, list[str]]:
    """``--preserve``: ``star,square`` (the same anchors for every target, a target's own word
    skipped) or ``triangle:star,red:green+purple`` (per target; targets not named get none)."""
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    if not any(":" in x for x in items):
        return {t: [w for w in items if w != t] for t in targets} if items else {}
    out: dict[str, list[str]] = {}
    for item in items:
        target, sep, words = item.partition(":")
        if not sep or target.strip() not in targets or not words.strip():
            raise ValueError(f"--preserve item {item!r}: expected TARGET:WORD+WORD with TARGET one of {', '.join(targets)}")
        out.setdefault(target.strip(), []).extend(w.strip() for w in words.split("+") if w.strip())
    return out


def anchor_columns(target: str, anchors: list[str]) -> list[Column]:
    """Every prompted word of the anchors' attributes (all their synonyms, held-out ones too)."""
    attributes = list(dict.fromkeys(WORD_ATTRIBUTE[a] for a in anchors if a in WORD_ATTRIBUTE))
    return [c for a in attributes if a != target for c in columns_for(kind_of(a)) if c.attribute == a]


def bar_check(removal: dict[Column, tuple[float, int]], target: str, anchor_attrs: set[str], kept: float,
              null_kept: float) -> dict:
    """The issue's bar: removal >= 0.95 on the target's words (synonyms, held-out ones), <= 0.05 on
    the anchors' words, <= 0.10 on every other word; attributes kept within 0.02 of the null floor."""
    def pick(keep):
        got = [(c.word + ("*" if c.held_out else ""), r, n) for c, (r, n) in removal.items() if keep(c) and n]
        return got
    own = pick(lambda c: c.attribute == target)
    anchors = pick(lambda c: c.attribute in anchor_attrs)
    other = pick(lambda c: c.attribute != target and c.attribute not in anchor_attrs)
    worst_own = min(own, key=lambda x: x[1]) if own else None
    worst_anchor = max(anchors, key=lambda x: x[1]) if anchors else None
    worst_other = max(other, key=lambda x: x[1]) if other else None
    ok = dict(target=bool(own) and worst_own[1] >= 0.95, anchors=not anchors or worst_anchor[1] <= 0.05,
              other=not other or worst_other[1] <= 0.10, kept=kept >= null_kept - 0.02)
    return dict(target_words={w: r for w, r, _ in own}, min_target=worst_own, anchor_words={w: r for w, r, _ in anchors},
                max_anchor=worst_anchor, max_other=worst_other, kept=kept, null_kept=null_kept, ok=ok, met=all(ok.values()))


def _fmt_worst(x) -> str:
    return "-" if x is None else f"{x[1]:.2f} ({x[0]}, n={x[2]})"


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
    parser.add_argument("--variant", default=None, choices=("sink-pads",),
                        help="the UNet's sink-pads variant (docs/shapes.md); default: the shipped model")
    parser.add_argument("--weights", type=pathlib.Path, default=None,
                        help="a shapes weights folder instead of the packaged one (e.g. a training run's output; "
                             "with --variant, the folder of the variant's UNet, sink and model.json); the detector is always the packaged one")
    parser.add_argument("--sink", default=None, help="Guard(sink=...) for every GIE run (default: the family's)")
    parser.add_argument("--text-states", default=None, choices=("ride-along", "static"),
                        help="Guard(text_states=...) for the transformer backbone")
    # precision (docs/precision.md): preservation anchors and presence gating
    parser.add_argument("--preserve", default=None, metavar="WORDS",
                        help="preservation anchors for the --targets: 'star,square' (the same anchors for every "
                             "target; a target's own word is skipped) or 'triangle:star,red:green+purple' (per "
                             "target, '+' between words; targets not named get none). Adds a GIE row per "
                             "--preserve-by mechanism, named 'GIE w=S +anchors(MECHANISM)', and repeats the sweep "
                             "with anchors on")
    parser.add_argument("--preserve-by", default="compete",
                        help="the anchors' mechanism (policy key preserve_by): compete, project, both, a "
                             "comma-separated list of them, or 'all'; each runs as its own row")
    parser.add_argument("--gate", type=float, default=None, metavar="THRESHOLD",
                        help="adds a presence-gated GIE row, 'GIE w=S +gate(THRESHOLD)' (policy key presence), "
                             "the measured presence distributions and, in gate mode, thresholds simulated from them")
    parser.add_argument("--gate-mode", default="gate", choices=("gate", "scale"), help="presence mode of the --gate row")
    parser.add_argument("--gate-with-anchors", default=None, choices=("compete", "project", "both"),
                        help="also a row with the gate and the anchors by this mechanism together")
    parser.add_argument("--gate-sweep", default=None,
                        help="thresholds to simulate from the measured presence (gate mode; default: the "
                             "--gate threshold times 0.25, 0.5, 0.75, 1, 1.5, 2, 3)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the scale/window sweep (needs --scale)")
    parser.add_argument("--no-multi", action="store_true", help="skip the several-concepts-at-once table")
    parser.add_argument("--preservation-seeds", default=None,
                        help="START:END seeds for the attributes-kept table (prompts of the other kinds; a cost "
                             "knob; default: --seeds). The null floor uses the same seeds")
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU", help="machine description for results.md")
    parser.add_argument("--smoke", action="store_true",
                        help="one target, one seed, 4 steps, no sweep, baselines or multi-concept table: seconds (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        global STEPS
        STEPS = 4
        args.targets, args.seeds, args.scale = "circle", "0:1", 2.0
        args.no_sweep = args.no_baselines = args.no_multi = True
    if args.no_sweep and args.scale is None:
        parser.error("--no-sweep needs --scale")
    mechanisms = ["compete", "project", "both"] if args.preserve_by == "all" else args.preserve_by.split(",")
    if not mechanisms or not set(mechanisms) <= {"compete", "project", "both"}:
        parser.error(f"--preserve-by: compete, project, both, a list of them or all; got {args.preserve_by!r}")
    gate_spec = (args.gate_mode, args.gate) if args.gate is not None else None
    gate_label = "" if gate_spec is None else (f" +gate({args.gate:g})" if args.gate_mode == "gate"
                                               else f" +gate(scale,{args.gate:g})")
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
    try:
        preserve = parse_preserve(args.preserve, targets)
    except ValueError as e:
        parser.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(range(start, end), args.out, args.backbone, args.variant, args.weights)
    window = tuple(float(x) for x in args.window.split(","))
    rows: list[dict] = []
    md: list[str] = [f"# Erasure on the shapes-world model ({args.backbone}{', variant ' + args.variant if args.variant else ''})\n\nseeds {start}:{end} per prompted word ({'no sweep' if args.no_sweep else 'sweep: ' + args.sweep_seeds}), "
                     f"{STEPS} DDIM steps, guidance {GUIDANCE}, command: `python benchmarks/erasure.py {' '.join(argv or sys.argv[1:])}`\n"]
    if preserve:
        md.append("anchors: " + "; ".join(f"{t}: {', '.join(a)}" for t, a in preserve.items()) + f" (by {', '.join(mechanisms)})\n")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    # 1. sweep of fixed scales and windows: removal on the target's own words, collateral on the rest
    md.append("## Scale and window sweep\n\nremoval = on prompts naming the target (word and synonyms); "
              "changed = share of other prompts' images with any attribute changed; null = the same for "
              f"the meaningless concept {NULL_CONCEPT!r} at that scale and window.\n")
    md.append("anchors = the --preserve mechanism (- = none); anchor removal = removal on prompts naming the "
              "target's anchors (any of their words).\n")
    md.append("| target | window | scale | anchors | removal | anchor removal | changed | null changed |\n|---|---|---|---|---|---|---|---|")
    best_scale: dict[str, float] = {}
    for target in targets:
        cols = columns_for(kind_of(target))
        own = [c for c in cols if c.attribute == target]
        other = [c for c in cols if c.attribute != target and not c.held_out]
        anchors = preserve.get(target, [])
        spared = anchor_columns(target, anchors)
        if args.no_sweep:
            best_scale[target] = args.scale
            continue
        saved = bench.seeds
        bench.seeds = sweep_seeds
        candidates = []
        for w in args.sweep_windows.split(","):
            win = tuple(float(x) for x in w.split("-"))
            for s in (float(x) for x in args.sweep_scales.split(",")):
                _, null_changed, _ = bench.preservation(gie([NULL_CONCEPT], s, win), other, {target})
                for mech in [None] + (mechanisms if anchors else []):
                    method = gie([target], s, win, anchors if mech else (), mech)
                    removal = bench.removal(method, own)
                    rate = _pooled(removal)
                    anchor_rate = _pooled(bench.removal(method, spared)) if spared else float("nan")
                    _, changed, _ = bench.preservation(method, other, {target})
                    md.append(f"| {target} | {win[0]:g}-{win[1]:g} | {s:g} | {mech or '-'} | {rate:.2f} | "
                              f"{'-' if not spared else f'{anchor_rate:.2f}'} | {changed:.2f} | {null_changed:.2f} |")
                    rows.append(dict(method="gie-sweep" + (f" +anchors({mech})" if mech else ""), target=target,
                                     prompt_word=target, prompt_attribute=target, scale=s, window=list(win),
                                     removal_rate=rate, images=sum(n for _, n in removal.values()),
                                     anchors=anchors if mech else [], preserve_by=mech,
                                     anchor_removal=anchor_rate if spared else None,
                                     changed_other=changed, null_changed_other=null_changed))
                    if win == window and mech is None:
                        candidates.append((rate, -changed, s))
                    log(f"sweep {target} {win} w={s} anchors={mech}: removal {rate:.2f} anchors "
                        f"{anchor_rate:.2f} changed {changed:.2f} null {null_changed:.2f}")
        bench.seeds = saved
        # the default: the smallest scale reaching the best removal within 0.05
        top = max(r for r, _, _ in candidates)
        best_scale[target] = args.scale or min(s for r, _, s in candidates if r >= top - 0.05)

    # 2. the paper's Table 2 analogue per target: removal by prompted word, GIE and baselines
    for target in [] if args.sweep_only else targets:
        anchors = preserve.get(target, [])
        spared = anchor_columns(target, anchors)
        anchor_attrs = {c.attribute for c in spared}
        cols = columns_for(kind_of(target))
        cols += [c for c in spared if c not in cols]  # anchors of another kind get their own columns
        scale = best_scale[target]
        reference = f"GIE w={scale:g}"
        methods = {reference: gie([target], scale, window)}
        gated: dict[str, str] = {}  # gated row -> the row it gates (same settings, no gate)
        for mech in mechanisms if anchors else []:
            methods[f"{reference} +anchors({mech})"] = gie([target], scale, window, anchors, mech)
        if gate_spec:
            methods[reference + gate_label] = gie([target], scale, window, gate=gate_spec)
            gated[reference + gate_label] = reference
            if anchors and args.gate_with_anchors:
                mech = args.gate_with_anchors
                label = f"{reference} +anchors({mech}){gate_label}"
                methods[label] = gie([target], scale, window, anchors, mech, gate_spec)
                gated[label] = f"{reference} +anchors({mech})"
                methods.setdefault(gated[label], gie([target], scale, window, anchors, mech))
        if not args.no_baselines:
            methods["SD+NEG"] = f"neg:{target}"
            if args.backbone == "unet":
                methods["SLD-medium"] = f"sld:{target}"
        md.append(f"\n## Erasing {target!r} ({kind_of(target)}s)\n\nremoval rate by prompted word "
                  "(held-out synonyms marked *); n = seeds whose unguarded image has the prompted attribute\n")
        md.append("| method | " + " | ".join(c.word + ("*" if c.held_out else "") for c in cols) + " |")
        md.append("|---|" + "---|" * len(cols))
        removals: dict[str, dict[Column, tuple[float, int]]] = {}
        for label, method in methods.items():
            removal = removals[label] = bench.removal(method, cols)
            md.append(f"| {label} | " + " | ".join(f"{r:.2f} (n={n})" for r, n in removal.values()) + " |")
            for c, (r, n) in removal.items():
                rows.append(dict(method=label, target=target, prompt_word=c.word, prompt_attribute=c.attribute,
                                 held_out=c.held_out, removal_rate=r, images=n, scale=scale, window=list(window)))
            log(f"table {target} {label} done")
        # preservation on prompts that never name the target, with the null control
        others = [c for k in KINDS for c in columns_for(k) if not c.held_out and c.attribute != target]
        kept_by: dict[str, float] = {}
        null_label = f"null {NULL_CONCEPT!r} w={scale:g}"
        saved = bench.seeds
        if args.preservation_seeds:
            bench.seeds = range(*(int(x) for x in args.preservation_seeds.split(":")))
            md.append(f"\nattributes kept: seeds {args.preservation_seeds}")
        md.append("\n| method | attributes kept | any attribute changed | Frechet (detector logits) |\n|---|---|---|---|")
        for label, method in {**methods, null_label: gie([NULL_CONCEPT], scale, window)}.items():
            kept, changed, fd = bench.preservation(method, others, {target})
            kept_by[label] = kept
            md.append(f"| {label} | {kept:.3f} | {changed:.3f} | {fd:.3f} |")
            rows.append(dict(method=label, target=target, prompt_word="(other kinds)", prompt_attribute=None,
                             removal_rate=None, images=len(others) * len(bench.seeds), kept=kept, changed=changed, frechet=fd))
        bench.seeds = saved
        log(f"preservation {target} done")
        # the bar, per method
        md.append(f"\nThe bar (removal >= 0.95 on every word of {target!r}; <= 0.05 on the anchors' words "
                  f"({', '.join(anchors) or 'none given'}); <= 0.10 on every other word; attributes kept >= the "
                  f"null floor {kept_by[null_label]:.3f} - 0.02). Worst word shown, n = eligible seeds.\n")
        md.append("| method | min on target words | max on anchors | max on other words | kept - null | met |\n|---|---|---|---|---|---|")
        for label in methods:
            check = bar_check(removals[label], target, anchor_attrs, kept_by[label], kept_by[null_label])
            marks = {k: "" if v else " ✗" for k, v in check["ok"].items()}
            md.append(f"| {label} | {_fmt_worst(check['min_target'])}{marks['target']} | {_fmt_worst(check['max_anchor'])}"
                      f"{marks['anchors']} | {_fmt_worst(check['max_other'])}{marks['other']} | "
                      f"{check['kept'] - check['null_kept']:+.3f}{marks['kept']} | {'yes' if check['met'] else 'no'} |")
            rows.append(dict(method=label, target=target, prompt_word="(bar)", anchors=anchors, **check))
        # presence gating: what the gate measured, and thresholds simulated from it
        for label, ungated in gated.items():
            section_rows = presence_tables(bench, methods[label], methods[ungated], label, target, cols, others,
                                           anchor_attrs, args, md, kept_by[null_label],
                                           range(*(int(x) for x in args.preservation_seeds.split(":")))
                                           if args.preservation_seeds else bench.seeds)
            rows += [dict(r, method=label, target=target) for r in section_rows]
            log(f"presence {target} {label} done")

    # 3. several concepts at once: a shape with a style (the paper's object + style), then four
    groups = []
    shapes = [t for t in targets if kind_of(t) == "shape"]
    styles = [t for t in targets if kind_of(t) == "style"]
    if shapes and styles:
        groups.append([shapes[0], styles[0]])
    if len(targets) >= 4:
        groups.append(targets[:4])
    if args.sweep_only or args.no_multi:
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

    md[0] += (f"\nwall {(time.perf_counter() - t0) / 60:.1f} min, {time.strftime('%Y-%m-%d')}, machine: {args.machine}, "
              f"{args.threads} torch thread(s)\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    if not args.sweep_only:
        grid(bench, targets, best_scale, window, args.out / "grid.png", baselines=not args.no_baselines,
             sld=args.backbone == "unet")
    print("\n".join(md))
    log(f"wrote {args.out}/results.json, results.md, grid.png")
    return 0


def presence_tables(bench: Bench, method: str, ungated: str, label: str, target: str, cols: list[Column],
                    others: list[Column], anchor_attrs: set[str], args, md: list[str], null_kept: float,
                    others_seeds: range) -> list[dict]:
    """The presence the gate measured per image (first concept), by what the prompt names; in
    gate mode, the bar at other thresholds simulated from it: an open gate's image is the ungated
    row's image, a closed gate's the unguarded image (checked at the run's own threshold).
    ``cols`` at the benchmark's seeds, ``others`` (the attributes-kept prompts) at ``others_seeds``."""
    saved = bench.seeds

    def at(seeds: range, columns: list[Column], m: str) -> dict[Column, np.ndarray]:
        bench.seeds = seeds
        try:
            return bench.images(m, columns)
        finally:
            bench.seeds = saved

    def presence_at(seeds: range, columns: list[Column]) -> dict[Column, np.ndarray]:
        at(seeds, columns, method)
        return {c: bench.presence[(method, c, tuple(seeds))][:, 0] for c in columns}

    parts = [(saved, cols), (others_seeds, [c for c in others if c not in cols])]
    groups: dict[str, list[float]] = {}
    for seeds, columns in parts:
        for c, values in presence_at(seeds, columns).items():
            for i, seed in enumerate(seeds):
                if target in c.attributes(seed).values():
                    group = ("names the target: held-out synonym" if c.held_out and c.attribute == target
                             else "names the target: word or synonym")
                elif c.attribute in anchor_attrs:
                    group = "names an anchor (not the target)"
                elif kind_of(c.attribute) == kind_of(target):
                    group = "other words of the target's kind"
                else:
                    group = "other kinds' prompts (no target)"
                groups.setdefault(group, []).append(float(values[i]))
    md.append(f"\nPresence measured by `{label}` (share of the first step's attention on {target!r}'s own tokens, "
              "mean over sites), per image:\n")
    md.append("| prompts | images | min | median | max | gate open |\n|---|---|---|---|---|---|")
    out = []
    order = ["names the target: word or synonym", "names the target: held-out synonym", "names an anchor (not the target)",
             "other words of the target's kind", "other kinds' prompts (no target)"]
    for group in [g for g in order if g in groups]:
        v = np.array(groups[group])
        md.append(f"| {group} | {len(v)} | {v.min():.4f} | {np.median(v):.4f} | {v.max():.4f} | {(v >= args.gate).mean():.2f} |")
        out.append(dict(prompt_word=f"(presence: {group})", images=len(v), presence_min=float(v.min()),
                        presence_median=float(np.median(v)), presence_max=float(v.max()),
                        gate_open=float((v >= args.gate).mean()), presence=[round(float(x), 6) for x in v]))
    if args.gate_mode != "gate":
        return out
    # thresholds simulated from the presence: open = the ungated row's image, closed = the unguarded image
    thresholds = ([float(x) for x in args.gate_sweep.split(",")] if args.gate_sweep
                  else [args.gate * f for f in (0.25, 0.5, 0.75, 1, 1.5, 2, 3)])
    found: dict[tuple[str, Column, tuple[int, ...]], list[set[str]]] = {}
    pres: dict[tuple[Column, tuple[int, ...]], np.ndarray] = {}
    diff, mismatch, checked = [], 0, 0
    for seeds, columns in [(saved, cols), (others_seeds, others)]:
        plain, ref, real = at(seeds, columns, "none"), at(seeds, columns, ungated), at(seeds, columns, method)
        for c, p in presence_at(seeds, columns).items():
            key = tuple(seeds)
            pres[(c, key)] = p
            found[("none", c, key)] = bench.found(plain[c])
            found[("ref", c, key)] = bench.found(ref[c])
            real_found = bench.found(real[c])
            for i in range(len(seeds)):  # the simulation's premise, at the run's own threshold
                sim = ref[c][i] if p[i] >= args.gate else plain[c][i]
                diff.append(int(np.abs(real[c][i].astype(int) - sim.astype(int)).max()))
                sim_found = found[("ref" if p[i] >= args.gate else "none", c, key)][i]
                mismatch += int(real_found[i] != sim_found)
                checked += 1
    md.append(f"\nThresholds simulated from that presence (open: the ungated row's image; closed: the unguarded image). "
              f"Check at the run's threshold {args.gate:g}: of {checked} real gated images, {sum(d > 0 for d in diff)} "
              f"differ from the simulated one in any pixel (largest difference {max(diff)} of 255 levels; batches of "
              f"another make-up round differently) and {mismatch} in the attributes the detector finds.\n")
    md.append("| threshold | min on target words | max on anchors | max on other words | kept - null | met |\n|---|---|---|---|---|---|")
    n_full, n_other = tuple(saved), tuple(others_seeds)
    for t in thresholds:
        def after(c: Column, key: tuple[int, ...]) -> list[set[str]]:
            return [found[("ref" if pres[(c, key)][i] >= t else "none", c, key)][i] for i in range(len(key))]
        removal = {}
        for c in cols:
            before, now = found[("none", c, n_full)], after(c, n_full)
            had = [i for i, f in enumerate(before) if c.attribute in f]
            gone = [i for i in had if c.attribute not in now[i]]
            removal[c] = (len(gone) / len(had) if had else float("nan"), len(had))
        kept_num = kept_den = 0
        for c in others:
            before, now = found[("none", c, n_other)], after(c, n_other)
            for i, seed in enumerate(others_seeds):
                if target not in c.attributes(seed).values():
                    kept_num += len(before[i] & now[i])
                    kept_den += len(before[i])
        kept = kept_num / max(1, kept_den)
        check = bar_check(removal, target, anchor_attrs, kept, null_kept)
        marks = {k: "" if v else " ✗" for k, v in check["ok"].items()}
        md.append(f"| {t:.4g} | {_fmt_worst(check['min_target'])}{marks['target']} | {_fmt_worst(check['max_anchor'])}"
                  f"{marks['anchors']} | {_fmt_worst(check['max_other'])}{marks['other']} | "
                  f"{kept - null_kept:+.3f}{marks['kept']} | {'yes' if check['met'] else 'no'} |")
        out.append(dict(prompt_word="(simulated gate)", threshold=t, simulated=True, **check))
    out.append(dict(prompt_word="(gate simulation check)", threshold=args.gate, images=checked,
                    pixel_differences=sum(d > 0 for d in diff), largest_difference=max(diff), detector_differences=mismatch))
    return out


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
