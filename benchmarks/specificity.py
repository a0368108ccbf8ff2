"""Specificity benchmark on the two-cell shapes world: does a method erase the target word and
nothing else? (docs/precision.md, "Specificity on the two-cell world"; issue 21, item 4)

Every measure compares the guarded image with the unguarded image of the same prompt and seed,
each judged cell by cell by the shipped detector (detector.detect_cells). Prompts name no
places, except the pairs with ``--pairs placed``: the two-cell UNet puts a thing at a named
place only about half the time, the two-cell transformer (3,000 steps) binds named places
(both things wholly right 0.78) better than place-less pairs (0.26; docs/shapes.md).

- target_removal: the target prompted alone ("a blue striped disk"), by its canonical word, its
  training synonyms and its held-out synonyms (world.py's tables; the row says which); among
  the seeds whose unguarded image shows the target attribute (the count is reported), the
  share whose guarded image shows it in neither cell. Bar: >= 0.95.
- other_kept: two things, one with the target and one with the other attribute ("a red
  circle and a blue square", order drawn per seed; with ``--pairs placed`` "a red circle on the
  left and a blue square on the right", places drawn per seed); among the seeds whose unguarded
  image shows the other attribute in some cell, the share whose guarded image holds exactly
  the same attributes (shape, colour, style) in that cell. Bar: >= 0.90.
- null_kept: the meaningless concept 'zqxv' in place of the target, by the same method at the
  same scale and window (for the baselines: 'zqxv' as the negative prompt / safety concept), on
  prompts naming whatever the seed draws (one or two things); the share of images whose every
  cell holds exactly what it held unguarded. Bar: >= 0.95.
- sibling_removal: removal (as above) on the target's siblings, the other values of its kind
  (circle: square, triangle, star, cross), each prompted alone by its canonical word; the
  largest of them, and which word it was. Bar: <= 0.10.

Also reported, without a bar: pair_target_removal, the target's removal in the two-thing
prompts; other_shown_anywhere / other_shown_in_place, the looser questions behind other_kept
(is the other attribute still drawn at all / still in its cell); null_attributes_kept, the
null concept's share of (cell, attribute) pairs kept, as erasure.py counts "attributes kept".

Methods are the rows of METHODS (name -> how to guard). GIE rows erase the target at the
scale and window the erasure benchmarks chose for each backbone (SCALES; benchmarks/results/
erasure.md and erasure-dit/, window 0-1), as one policy concept. `default` is Guard exactly as
shipped (the family's default sink, the policy's default preserve_by); the explicit sink rows
are the maps GIE can use today on that backbone (UNet: own, prompt; transformer: image,
prompt); the anchor rows give the concept the target's siblings as preservation anchors
(policy `preserve`, with `preserve_by` compete or project, as erasure.py's --preserve does).
Baselines: `negative-prompt` (the unguarded pipeline, the target as negative prompt) and
`sld`, diffusers' Safe Latent Diffusion (StableDiffusionPipelineSafe, "medium" settings as in
erasure.py, the target as safety concept), built from the two-cell UNet pipeline's own
components (its constructor compares ``unet.config.sample_size < 64``, a TypeError for the
two-cell UNet's rectangular (8, 16), so the config holds an int while it is built; nothing
else reads it, since height and width are always passed); SLD exists for Stable Diffusion 1.x
pipelines only, so it does not apply to the transformer. A row whose method does not apply to the backbone, or that the guard refuses with
a ConfigurationError, is skipped and says why in results.md. A new engine option is a new row:
``guard_options`` are Guard(...) keyword arguments, ``policy_options`` policy keys.

    python benchmarks/specificity.py --backbone unet --target circle --other square --seeds 0:16 --out DIR
    python benchmarks/specificity.py --backbone dit --target red --other blue --seeds 0:16 --out DIR \\
        --method default --method anchors-project
    python benchmarks/specificity.py --backbone unet --target circle --other square --out DIR --smoke

Writes DIR/results.json (one row per method) and DIR/results.md (the same as a table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gie_guard import Guard  # noqa: E402
from gie_guard.errors import ConfigurationError  # noqa: E402
from gie_guard.shapes import load_detector, load_pipeline  # noqa: E402
from gie_guard.shapes import specificity as S  # noqa: E402
from gie_guard.shapes.detector import detect_cells  # noqa: E402
from gie_guard.shapes.world_two import HEIGHT, WIDTH  # noqa: E402

STEPS = 20
GUIDANCE = 5.0
NULL_CONCEPT = "zqxv"
WINDOW = (0.0, 1.0)
# the scale each erasure benchmark chose per target (benchmarks/results/erasure.md for the UNet,
# erasure-dit/results.md for the transformer; docs/shapes.md "Erasure on the transformer model"),
# all with window 0-1; other targets need --scale
SCALES = {
    "unet": {"circle": 2.0, "red": 1.0, "striped": 10.0, "star": 1.0},
    "dit": {"circle": 2.0, "red": 1.0, "striped": 1.0, "star": 1.0},
}
# Safe Latent Diffusion's "medium" setting, its warm-up rescaled from 50 to our 20 steps (as erasure.py)
SLD_SETTINGS = dict(sld_guidance_scale=1000, sld_warmup_steps=4, sld_threshold=0.01, sld_momentum_scale=0.3,
                    sld_mom_beta=0.4)
BARS = {"target_removal": (">=", 0.95), "other_kept": (">=", 0.90), "null_kept": (">=", 0.95),
        "sibling_removal": ("<=", 0.10)}
BATCH = 32


@dataclasses.dataclass(frozen=True)
class Method:
    """How one row guards. GIE rows: ``guard_options`` go to Guard(...), ``policy_options`` into
    the policy dict, ``anchors`` (a preserve_by mechanism) spares the target's siblings.
    Baseline rows set ``baseline`` ("negative-prompt" or "sld") instead."""

    summary: str
    backbones: tuple[str, ...] = ("unet", "dit")
    guard_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    policy_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    anchors: str | None = None
    references: str | None = None  # "siblings": the target's siblings; "siblings-but-last": all but the last
    baseline: str | None = None


METHODS: dict[str, Method] = {
    "default": Method("Guard as shipped: the family's default sink and preserve_by, no anchors"),
    "gie-own": Method("GIE's own map, sink own: softmax over the concept's own encoding (the UNet's sink)",
                      backbones=("unet",), guard_options={"sink": "own", "concept_map": "gie"}),
    "gie-image-sink": Method("GIE's own map, sink image: the joint block's image keys compete (the SD3 default)",
                             backbones=("dit",), guard_options={"sink": "image", "concept_map": "gie"}),
    "gie-prompt-sink": Method("GIE's own map, sink prompt: the prompt's keys compete",
                              guard_options={"sink": "prompt", "concept_map": "gie"}),
    "anchors-compete": Method("GIE (default sink), the target's siblings as anchors, preserve_by compete",
                              anchors="compete"),
    "anchors-project": Method("GIE (default sink), the target's siblings as anchors, preserve_by project",
                              anchors="project"),
    "anchors-centroid": Method("GIE (default sink), the target's siblings as anchors, preserve_by centroid: the "
                               "inhibitor's values minus the siblings' mean value", anchors="centroid"),
    "calibrated-centroid": Method("concept_map calibrated, the target's siblings as anchors, preserve_by centroid",
                                  guard_options={"concept_map": "calibrated"}, anchors="centroid"),
    "calibrated": Method("GIE (default sink), concept_map calibrated: relu(M_c - M_ref), references thing/object/picture",
                         guard_options={"concept_map": "calibrated"}),
    "gated": Method("GIE (default sink), concept_map gated: only where the concept's share beats the references'",
                    guard_options={"concept_map": "gated"}),
    "output": Method("GIE (default sink), concept_map output: ConceptAttention's output-space gate against the "
                     "references thing/object/picture", guard_options={"concept_map": "output"}),
    "output-siblings": Method("GIE (default sink), concept_map output against the target's siblings: only where the "
                              "pixel's attention output is nearer the target's than every sibling's",
                              guard_options={"concept_map": "output"}, references="siblings"),
    "output-siblings-held-out": Method("concept_map output against the target's siblings but the last, which is "
                                       "measured unnamed", guard_options={"concept_map": "output"},
                                       references="siblings-but-last"),
    "calibrated-project": Method("concept_map calibrated, the target's siblings as anchors, preserve_by project",
                                 guard_options={"concept_map": "calibrated"}, anchors="project"),
    "contrast": Method("GIE (default sink), concept_map contrast: relu(M_c - max_r M_r), the target's siblings as "
                       "references", guard_options={"concept_map": "contrast"}, references="siblings"),
    "contrast-held-out": Method("concept_map contrast, references: the target's siblings but the last, which is "
                                "measured unnamed", guard_options={"concept_map": "contrast"},
                                references="siblings-but-last"),
    "negative-prompt": Method("unguarded pipeline, the target as negative prompt", baseline="negative-prompt"),
    "sld": Method("Safe Latent Diffusion (medium), the target as safety concept", backbones=("unet",),
                  baseline="sld"),
}
SMOKE_METHODS = ("default", "negative-prompt")


class Runner:
    """One two-cell pipeline and the detector; images are generated once per (run, prompts,
    seeds) and kept as what the detector found in their cells."""

    def __init__(self, backbone: str, steps: int) -> None:
        self.backbone = backbone
        self.steps = steps
        self.pipe = load_pipeline(world="two", backbone=backbone)
        self.pipe.set_progress_bar_config(disable=True)
        self.detector = load_detector()
        self._found: dict[tuple[str, tuple[str, ...], tuple[int, ...]], list[S.Cells]] = {}
        self._sld: Any = None
        from prometheus_client import CollectorRegistry

        from gie_guard.metrics import GuardMetrics

        self.metrics = GuardMetrics(CollectorRegistry())  # the benchmark's own registry
        self.generated = 0

    def cells(self, run: str, call: Callable[..., Any], prompts: Sequence[str], seeds: Sequence[int],
              **extra: Any) -> list[S.Cells]:
        """What the detector finds in each image of ``call`` on ``prompts`` (image i from seed i);
        ``run`` names the call's settings: equal names are taken to give equal images."""
        key = (run, tuple(prompts), tuple(seeds))
        if key not in self._found:
            images = []
            for i in range(0, len(prompts), BATCH):
                part = list(prompts[i:i + BATCH])
                out = call(prompt=part, num_inference_steps=self.steps, guidance_scale=GUIDANCE,
                           generator=[torch.Generator().manual_seed(int(s)) for s in seeds[i:i + BATCH]],
                           output_type="np", height=HEIGHT, width=WIDTH,
                           **{k: v[i:i + BATCH] if isinstance(v, list) else v for k, v in extra.items()}).images
                images.append(np.round(out * 255).astype(np.uint8))
            self._found[key] = detect_cells(self.detector, np.concatenate(images))
            self.generated += len(prompts)
        return self._found[key]

    def unguarded(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[S.Cells]:
        return self.cells("unguarded", self.pipe, prompts, seeds)

    def method(self, method: Method, text: str, target: str, scale: float) -> tuple[str, Callable[..., Any], dict[str, Any]]:
        """(run name, call, extra call arguments) erasing ``text`` by ``method``; ``target``'s
        siblings are the anchors of anchor rows."""
        if method.baseline == "negative-prompt":
            return f"negative-prompt:{text}", self._negative(text), {}
        if method.baseline == "sld":
            sld = self.sld
            return f"sld:{text}", self._sld_call(sld, text), dict(SLD_SETTINGS)
        concept: dict[str, Any] = {"id": "concept", "text": text, "scale": scale}
        policy: dict[str, Any] = {"name": "specificity", "inhibit_steps": list(WINDOW), "dedup_threshold": 0.0,
                                  "concepts": [concept], **method.policy_options}
        if method.anchors:
            concept["preserve"] = list(S.siblings(target))
            policy["preserve_by"] = method.anchors
        options: dict[str, Any] = dict(method.guard_options)
        if method.references:
            siblings = list(S.siblings(target))
            options["references"] = siblings[:-1] if method.references == "siblings-but-last" else siblings
        guard = Guard(policy=policy, metrics=self.metrics, exclusive=False, **options)
        # the row's run name holds the sink the plan resolved to, so `default` and the explicit
        # row of the same sink share their images instead of generating them twice
        options["sink"] = guard.plan_for(self.pipe).sink
        run = "gie:" + json.dumps({"policy": policy, "options": options}, sort_keys=True)
        return run, lambda **kw: guard(self.pipe, **kw), {}

    def _negative(self, text: str) -> Callable[..., Any]:
        def call(**kw: Any) -> Any:
            return self.pipe(negative_prompt=[text] * len(kw["prompt"]), **kw)
        return call

    @staticmethod
    def _sld_call(sld: Any, text: str) -> Callable[..., Any]:
        def call(**kw: Any) -> Any:
            sld.safety_concept = text
            return sld(**kw)
        return call

    @property
    def sld(self) -> Any:
        if self._sld is None:
            from diffusers import StableDiffusionPipelineSafe

            p = self.pipe
            # SLD's constructor compares unet.config.sample_size < 64, which raises TypeError for the
            # two-cell UNet's rectangular (8, 16); sample_size is read only there and for the default
            # height and width (always passed here), so the config holds an int while it is built
            rectangle = p.unet.config.sample_size
            p.unet.register_to_config(sample_size=max(rectangle))
            try:
                self._sld = StableDiffusionPipelineSafe(
                    vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet, scheduler=p.scheduler,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                )
            finally:
                p.unet.register_to_config(sample_size=rectangle)
            self._sld.set_progress_bar_config(disable=True)
        return self._sld


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Every prompt the benchmark measures on, per seed."""

    seeds: tuple[int, ...]
    target: S.Words
    other: str
    sibling_words: tuple[str, ...]
    placed: bool = False  # pair prompts name each thing's place

    def target_alone(self, word: str) -> list[str]:
        return [S.single_prompt(word, self.target.attribute, s) for s in self.seeds]

    def pair(self) -> list[str]:
        return [S.pair_prompt(self.target.attribute, self.other, s, placed=self.placed) for s in self.seeds]

    def pair_others(self) -> list[dict[str, str]]:
        return [S.pair_things(self.target.attribute, self.other, s)[1] for s in self.seeds]

    def various(self) -> list[str]:
        return [S.various_prompt(s) for s in self.seeds]

    def sibling(self, word: str) -> list[str]:
        return [S.single_prompt(word, word, s) for s in self.seeds]


def measure(runner: Runner, method: Method, prompts: Prompts, scale: float) -> dict[str, Any]:
    """The row's measures (see the module docstring)."""
    target, seeds = prompts.target.attribute, list(prompts.seeds)
    run, call, extra = runner.method(method, target, target, scale)
    null_run, null_call, null_extra = runner.method(method, NULL_CONCEPT, target, scale)
    by_word = {}
    for word in prompts.target.all():
        before = runner.unguarded(prompts.target_alone(word), seeds)
        by_word[word] = S.removal(before, runner.cells(run, call, prompts.target_alone(word), seeds, **extra), target)
    pair_before = runner.unguarded(prompts.pair(), seeds)
    pair_after = runner.cells(run, call, prompts.pair(), seeds, **extra)
    siblings = {}
    for word in prompts.sibling_words:
        before = runner.unguarded(prompts.sibling(word), seeds)
        siblings[word] = S.removal(before, runner.cells(run, call, prompts.sibling(word), seeds, **extra), word)
    null_before = runner.unguarded(prompts.various(), seeds)
    null_after = runner.cells(null_run, null_call, prompts.various(), seeds, **null_extra)
    null = S.all_kept(null_before, null_after)
    worst = max(((r, w) for w, (r, n) in siblings.items() if n), default=(float("nan"), None))
    removal, removal_n = S.pooled(list(by_word.values()))
    other_kept, other_n = S.other_kept(pair_before, pair_after, prompts.pair_others(), prompts.other, target)
    (other_anywhere, _), (other_in_place, _) = S.other_survives(pair_before, pair_after, prompts.pair_others(),
                                                                 prompts.other, target)
    pair_removal, pair_n = S.removal(pair_before, pair_after, target)
    return dict(target_removal=removal, target_removal_n=removal_n, target_removal_by_word=by_word,
                other_kept=other_kept, other_kept_n=other_n, other_shown_anywhere=other_anywhere,
                other_shown_in_place=other_in_place, pair_target_removal=pair_removal,
                pair_target_removal_n=pair_n, null_kept=null[0], null_n=null[1],
                null_attributes_kept=S.attributes_kept(null_before, null_after), sibling_removal=worst[0],
                sibling_worst_word=worst[1], sibling_removal_by_word=siblings)


def meets(row: Mapping[str, Any]) -> dict[str, bool]:
    """Per measure, whether the row meets its bar (a nan measure does not)."""
    return {k: bool(row[k] >= bar if op == ">=" else row[k] <= bar) for k, (op, bar) in BARS.items()}


def _rate(value: float, n: int | None = None) -> str:
    text = "-" if value != value else f"{value:.2f}"
    return text if n is None else f"{text} (n={n})"


def markdown(rows: Sequence[Mapping[str, Any]], header: Sequence[str]) -> str:
    bar = ", ".join(f"{k} {op} {v:g}" for k, (op, v) in BARS.items())
    lines = [*header, "", f"Bars: {bar}; a measure that misses its bar is marked ✗.", "",
             "| method | target removal | other kept | null kept | sibling removal (worst word) | "
             "target removal in pairs | bars met |", "|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        if r["status"] != "ran":
            lines.append(f"| {r['method']} | skipped | | | | | |")
            notes.append(f"- `{r['method']}` skipped: {r['note']}")
            continue
        ok = r["meets"]

        def mark(key: str) -> str:
            return "" if ok[key] else " ✗"

        lines.append(
            f"| {r['method']} | {_rate(r['target_removal'], r['target_removal_n'])}{mark('target_removal')} | "
            f"{_rate(r['other_kept'], r['other_kept_n'])}{mark('other_kept')} | "
            f"{_rate(r['null_kept'], r['null_n'])}{mark('null_kept')} | "
            f"{_rate(r['sibling_removal'])} ({r['sibling_worst_word'] or '-'}){mark('sibling_removal')} | "
            f"{_rate(r['pair_target_removal'], r['pair_target_removal_n'])} | {sum(ok.values())}/4 |")
    ran = [r for r in rows if r["status"] == "ran"]
    if ran:
        lines += ["", "Diagnostics (no bar): how the other thing is lost in pairs (its attribute still shown in any "
                  "cell / in its unguarded cell, same eligible seeds as other kept), and the null concept's share of "
                  "(cell, attribute) pairs kept (erasure.py's attributes kept, per cell):", "",
                  "| method | other shown anywhere | other shown in place | null attributes kept |", "|---|---|---|---|"]
        for r in ran:
            lines.append(f"| {r['method']} | {_rate(r['other_shown_anywhere'])} | {_rate(r['other_shown_in_place'])} | "
                         f"{_rate(r['null_attributes_kept'])} |")
        words = list(ran[0]["target_removal_by_word"]) + list(ran[0]["sibling_removal_by_word"])
        lines += ["", "Removal per prompted word (target words first, then the siblings; n = seeds whose "
                  "unguarded image shows the attribute):", "",
                  "| method | " + " | ".join(words) + " |", "|---|" + "---|" * len(words)]
        for r in ran:
            per = {**r["target_removal_by_word"], **r["sibling_removal_by_word"]}
            lines.append(f"| {r['method']} | " + " | ".join(_rate(*per[w]) for w in words) + " |")
    if notes:
        lines += ["", "Skipped:", "", *notes]
    lines += ["", "Methods:", ""] + [f"- `{r['method']}`: {r['summary']}" for r in rows]
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    """nan (a measure with no eligible image) as null: strict JSON has no nan."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def parse_seeds(text: str) -> tuple[int, ...]:
    start, sep, end = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected START:END, got {text!r}")
    seeds = tuple(range(int(start), int(end)))
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=("unet", "dit"), required=True)
    parser.add_argument("--target", required=True, help="canonical attribute word to erase (circle, red, striped...)")
    parser.add_argument("--other", required=True, help="canonical attribute word of the other thing in pair prompts")
    parser.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0:16"), help="START:END seeds per prompt set")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--method", action="append", default=None, metavar="NAME",
                        help=f"a row to run (repeat for several; default: all): {', '.join(METHODS)}")
    parser.add_argument("--scale", type=float, default=None, help="GIE scale (default: the erasure benchmark's, SCALES)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a shared 2-core machine)")
    parser.add_argument("--pairs", choices=("place-less", "placed"), default="place-less",
                        help="two-thing prompts without places (default) or with each thing's place named")
    parser.add_argument("--smoke", action="store_true",
                        help="2 seeds, 4 steps, the canonical word only, one sibling, methods default and "
                             "negative-prompt: seconds (tests)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.method or () if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    for word in (args.target, args.other):
        try:
            S.kind_of(word)
        except ValueError as e:
            parser.error(str(e))
    if args.target == args.other:
        parser.error("--target and --other must differ")
    scale = args.scale if args.scale is not None else SCALES[args.backbone].get(args.target)
    if scale is None:
        parser.error(f"no measured scale for {args.target!r} on {args.backbone}; pass --scale")
    words = S.Words.of(args.target)
    sibling_words = S.siblings(args.target)
    seeds, steps = args.seeds, STEPS
    methods = args.method or list(METHODS)
    if args.smoke:
        seeds, steps = (0, 1), 4
        words, sibling_words = S.Words(args.target, (), ()), sibling_words[:1]
        methods = args.method or list(SMOKE_METHODS)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    runner = Runner(args.backbone, steps)
    prompts = Prompts(seeds, words, args.other, tuple(sibling_words), placed=args.pairs == "placed")
    rows: list[dict[str, Any]] = []
    for name in dict.fromkeys(methods):
        method = METHODS[name]
        row: dict[str, Any] = dict(method=name, backbone=args.backbone, target=args.target, other=args.other,
                                   n=len(seeds), summary=method.summary, scale=None if method.baseline else scale,
                                   window=None if method.baseline else list(WINDOW), target_words=dataclasses.asdict(words),
                                   sibling_words=list(sibling_words), pairs=args.pairs)
        if args.backbone not in method.backbones:
            why = ("Safe Latent Diffusion exists in diffusers for Stable Diffusion 1.x pipelines only "
                   "(StableDiffusionPipelineSafe); the transformer model is an SD3 pipeline"
                   if method.baseline == "sld" else f"applies to {', '.join(method.backbones)} only")
            rows.append(dict(row, status="skipped", note=why))
            log(f"{name}: skipped ({why})")
            continue
        try:
            row.update(measure(runner, method, prompts, scale))
        except ConfigurationError as e:  # an engine option this backbone's guard refuses
            rows.append(dict(row, status="skipped", note=f"the guard refused it: {e}"))
            log(f"{name}: skipped ({e})")
            continue
        row.update(status="ran", meets=meets(row))
        rows.append(row)
        log(f"{name}: target removal {row['target_removal']:.2f} other kept {row['other_kept']:.2f} "
            f"null kept {row['null_kept']:.2f} sibling removal {row['sibling_removal']:.2f} "
            f"({runner.generated} images so far)")
    wall = (time.perf_counter() - t0) / 60
    command = "python benchmarks/specificity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [
        f"# Specificity on the two-cell shapes world ({args.backbone}): erase {args.target!r}, keep {args.other!r}",
        "",
        f"`{command}`; seeds {seeds[0]}:{seeds[-1] + 1} (n = {len(seeds)} images per prompt set), {steps} steps, "
        f"guidance {GUIDANCE}, GIE scale {scale:g}, window {WINDOW[0]:g}-{WINDOW[1]:g}; {runner.generated} images, "
        f"wall {wall:.1f} min on a {os.cpu_count()}-core CPU, {args.threads} torch thread(s), {time.strftime('%Y-%m-%d')}.",
        "",
        f"Target words: {words.attribute}; synonyms: {', '.join(words.synonyms) or 'none'}; held-out synonyms: "
        f"{', '.join(words.held_out) or 'none'}. Siblings: {', '.join(sibling_words)}. Null concept: {NULL_CONCEPT!r}.",
        "",
        "target removal = share of target-alone images where the target is no longer detected in either cell "
        f"(n = seeds whose unguarded image shows it); other kept = share of two-thing {args.pairs} images whose "
        "other thing keeps its cell and its shape, colour and style (n = seeds whose unguarded image shows the "
        "other); null kept = share of images (one or two random things) unchanged in every cell with "
        f"{NULL_CONCEPT!r} erased the same way; sibling removal = the largest removal over the siblings prompted "
        "alone; target removal in pairs = the target's removal in the two-thing prompts.",
    ]
    (args.out / "results.json").write_text(json.dumps(_json_safe(rows), indent=1, allow_nan=False) + "\n")
    (args.out / "results.md").write_text(markdown(rows, header))
    print((args.out / "results.md").read_text())
    log(f"wrote {args.out}/results.json, results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
