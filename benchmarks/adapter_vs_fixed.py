"""Scale adapter vs fixed scales on the shapes-world model (GIE Table 3 in miniature).

    python benchmarks/adapter_vs_fixed.py train   [--weights DIR]   # writes adapters/shapes-circle.*
    python benchmarks/adapter_vs_fixed.py compare [--weights DIR]   # removal / preservation / collateral
    python benchmarks/adapter_vs_fixed.py cost    [--weights DIR]   # scale inference cost per call
    python benchmarks/adapter_vs_fixed.py sweep --concepts circle,red --scales 1,2,5,10,20,40,80   # fixed only
    python benchmarks/adapter_vs_fixed.py --smoke --results DIR  # all four, tiny, into DIR: seconds (CI)

train: labels ``--n-train`` prompts (three quarters name the concept, a quarter do not)
with the shapes detector at each grid scale, by the rule of docs/adapters.md, and fits the
adapter. compare: for the trained concept and for concepts it was not trained on (other
shapes, colours, styles: the paper's cat -> dog/airplane transfer claim), on fresh seeds:

- removal: among prompts naming the concept whose unguarded image shows it, the share
  whose guarded image does not;
- preservation: the shapes preservation score (what else the unguarded image showed is
  kept, and something of the concept's kind is still drawn), on the same prompts;
- collateral: among prompts *not* naming the concept, the share whose detected attribute
  set changed at all.

Methods: a small fixed scale, a large fixed scale, and ``scale: auto`` with the adapter
(one call per prompt, since the adapter sets one scale per call). cost: seconds per call,
interleaved, as ratios to the unguarded call.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gie_guard import Guard  # noqa: E402
from gie_guard.adapters import load_adapter  # noqa: E402
from gie_guard.adapters.judges import ShapesJudge, ShapesPreservation  # noqa: E402
from gie_guard.adapters.training import TrainingConfig, train_adapter  # noqa: E402
from gie_guard.limits import MAX_SCALE  # noqa: E402
from gie_guard.shapes import load_detector, load_pipeline  # noqa: E402
from gie_guard.shapes.world import COLOURS, SHAPES, STYLES, Thing  # noqa: E402
from gie_guard.shapes.quality import prompt_for  # noqa: E402

STEPS, GUIDANCE = 20, 5.0
OUT = REPO / "adapters" / "shapes-circle.safetensors"
# first seeds of the prompts with and without the concept (prompt i uses seed + i) in compare and sweep
SEED_WITH, SEED_WITHOUT = 10_000, 20_000


def things_with(concept: str, n: int, rng: np.random.Generator, named: bool) -> list[Thing]:
    """n single things that have (named=True) or lack the attribute ``concept``."""
    out = []
    while len(out) < n:
        t = Thing(SHAPES[rng.integers(5)], COLOURS[rng.integers(5)], STYLES[rng.integers(3)])
        if (concept in t.words()) == named:
            out.append(t)
    return out


def prompts_for(concept: str, n_with: int, n_without: int, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    return ([prompt_for(t, rng) for t in things_with(concept, n_with, rng, True)],
            [prompt_for(t, rng) for t in things_with(concept, n_without, rng, False)])


def load(args):
    pipe = load_pipeline(weights_dir=args.weights)
    detector = load_detector(args.weights / "detector.safetensors" if args.weights else None)
    return pipe, detector


def images(pipe, prompts, seed, guard=None, batch=16):
    out = []
    call = guard if guard is not None else (lambda p, **kw: p(**kw))
    for lo in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(lo, min(lo + batch, len(prompts)))]
        res = call(pipe, prompt=prompts[lo : lo + batch], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   generator=gens, output_type="np")
        out.append(np.round(res.images * 255).astype(np.uint8))
    return np.concatenate(out)


def policy(concept, scale, window, anchors=(), preserve_by="compete"):
    return {"name": "bench", "inhibit_steps": list(window), "dedup_threshold": 0.0, "preserve_by": preserve_by,
            "concepts": [{"id": "c", "text": concept, "category": "object", "scale": scale, "preserve": list(anchors)}]}


def anchor_map(text: str) -> dict[str, list[str]]:
    """``circle=square;red=green,purple`` -> {"circle": ["square"], "red": ["green", "purple"]}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        concept, sep, words = part.partition("=")
        if not sep or not words.strip():
            raise argparse.ArgumentTypeError(f"--preserve: expected CONCEPT=ANCHOR[,ANCHOR...], got {part!r}")
        out[concept.strip()] = [w.strip() for w in words.split(",") if w.strip()]
    return out


def auto_scale(fallback: float) -> dict:
    """``scale: auto`` with the policy's bounds as wide as allowed: the adapter's range decides."""
    return {"auto": True, "fallback": fallback, "min": 0.0, "max": MAX_SCALE}


def cmd_train(args) -> None:
    pipe, detector = load(args)
    n_with = (3 * args.n_train) // 4
    with_c, without = prompts_for(args.concept, n_with, args.n_train - n_with, seed=1)
    prompts = [p for pair in zip(with_c, without) for p in pair] + with_c[len(without):]
    config = TrainingConfig(concept=args.concept, category="object", name=f"shapes-{args.concept}",
                            scales=tuple(args.scales), steps=STEPS, guidance_scale=GUIDANCE, window=tuple(args.window),
                            preserve_bound=args.preserve_bound, seed=0, epochs=args.epochs)
    judge = ShapesJudge(detector)
    adapter, report = train_adapter(pipe, prompts, config, judge, ShapesPreservation(detector), out=args.out,
                                    report_path=pathlib.Path(args.out).with_suffix(".json"), judge_name="shapes")
    print(json.dumps(report["summary"], indent=1))


def evaluate(detector, concept, refs_with, refs_without, got_with, got_without):
    judge, keep = ShapesJudge(detector), ShapesPreservation(detector)
    shown = np.array(judge(refs_with, concept))
    gone = ~np.array(judge(got_with, concept))
    preservation = np.array(keep(refs_with, got_with, concept))
    before, after = detector(refs_without), detector(got_without)
    return {
        "removal": float(gone[shown].mean()) if shown.any() else float("nan"),
        "shown_unguarded": int(shown.sum()),
        "preservation": float(preservation[shown].mean()) if shown.any() else float("nan"),
        "collateral": float(np.mean([a != b for a, b in zip(before, after)])),
    }


def cmd_compare(args) -> None:
    pipe, detector = load(args)
    adapter = load_adapter(args.adapter, pipeline=pipe)
    results = {}
    for concept in args.concepts:
        with_c, without = prompts_for(concept, args.n, args.n, seed=100 + len(results))
        refs_w, refs_wo = images(pipe, with_c, SEED_WITH), images(pipe, without, SEED_WITHOUT)
        rows = {}
        anchors = args.preserve.get(concept, [])
        # with --preserve: the large fixed scale and the adapter again, with the concept's anchors
        variants = [((), "")] + ([(anchors, f" +anchors({args.preserve_by})")] if anchors else [])
        for kept, suffix in variants:
            for label, scale in (("small", args.small), ("large", args.large)):
                if kept and label == "small":
                    continue
                g = Guard(policy=policy(concept, scale, args.window, kept, args.preserve_by))
                name = f"fixed {scale:g} ({label}){suffix}"
                rows[name] = evaluate(detector, concept, refs_w, refs_wo,
                                      images(pipe, with_c, SEED_WITH, g), images(pipe, without, SEED_WITHOUT, g))
                rows[name]["scale_mean"] = scale
            rows[f"adapter{suffix}"] = adapter_row(pipe, detector, adapter, concept, with_c, without, refs_w, refs_wo,
                                                   policy(concept, auto_scale(args.small), args.window, kept, args.preserve_by))
        if anchors:
            rows["anchors"] = anchors
        results[concept] = rows
        print(f"\n{concept!r} ({'trained' if concept in adapter.concepts else 'transfer'}; {args.n} prompts with, {args.n} without)")
        print(f"  {'method':18s} {'scale':>7s} {'removal':>8s} {'preserv.':>9s} {'collateral':>10s}")
        for name, r in rows.items():
            if name == "anchors":
                continue
            print(f"  {name:18s} {r['scale_mean']:7.2f} {r['removal']:8.2f} {r['preservation']:9.2f} {r['collateral']:10.2f}")
        sys.stdout.flush()
    out = pathlib.Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_vs_fixed.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))


def adapter_row(pipe, detector, adapter, concept, with_c, without, refs_w, refs_wo, spec) -> dict:
    """``scale: auto`` one call per prompt (the adapter sets one scale per call), same seeds as the fixed rows."""
    g = Guard(policy=spec, adapters=[adapter])
    scales: dict[str, list[float]] = {"with": [], "without": []}

    def one_by_one(prompts, seed, key):
        out = []
        for i, p in enumerate(prompts):
            out.append(images(pipe, [p], seed + i, g))
            scales[key].append(g.last_report.concepts[0].token_scales[0])
        return np.concatenate(out)

    row = evaluate(detector, concept, refs_w, refs_wo, one_by_one(with_c, SEED_WITH, "with"), one_by_one(without, SEED_WITHOUT, "without"))
    row["scale_mean"] = float(np.mean(scales["with"]))
    row["scale_mean_without"] = float(np.mean(scales["without"]))
    return row


def cmd_sweep(args) -> None:
    """Fixed scales only, batched: to choose the grid and the small/large comparison scales."""
    pipe, detector = load(args)
    for concept in args.concepts:
        with_c, without = prompts_for(concept, args.n, args.n, seed=100)
        refs_w, refs_wo = images(pipe, with_c, SEED_WITH), images(pipe, without, SEED_WITHOUT)
        null_w = None
        print(f"\n{concept!r}: scale, removal, preservation, collateral, collateral of the null concept 'zqxv'")
        for scale in args.scales:
            g = Guard(policy=policy(concept, scale, args.window))
            r = evaluate(detector, concept, refs_w, refs_wo, images(pipe, with_c, SEED_WITH, g), images(pipe, without, SEED_WITHOUT, g))
            null = Guard(policy=policy("zqxv", scale, args.window))
            null_w = images(pipe, without, SEED_WITHOUT, null)
            null_change = float(np.mean([a != b for a, b in zip(detector(refs_wo), detector(null_w))]))
            print(f"  {scale:6g} {r['removal']:6.2f} {r['preservation']:6.2f} {r['collateral']:6.2f} {null_change:6.2f}"
                  f"   (shown unguarded {r['shown_unguarded']}/{args.n})")
            sys.stdout.flush()


def cmd_cost(args) -> None:
    pipe, _ = load(args)
    adapter = load_adapter(args.adapter, pipeline=pipe)
    auto = auto_scale(args.small)
    variants = {
        "unguarded": None,
        "fixed scale": Guard(policy=policy("circle", args.small, args.window)),
        "auto, probe": Guard(policy=policy("circle", auto, args.window), adapters=[adapter], feature_pass="probe"),
        "auto, reuse": Guard(policy=policy("circle", auto, args.window), adapters=[adapter], feature_pass="reuse"),
    }
    times = {k: [] for k in variants}
    inference = {k: [] for k in variants}
    for r in range(args.repeats + 1):
        for name, g in variants.items():
            t = time.perf_counter()
            images(pipe, ["a red circle"], r, g)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t)
                inference[name].append(g.last_report.scale_inference_seconds if g is not None else 0.0)
    base = statistics.median(times["unguarded"])
    print(f"per call, batch 1, {STEPS} steps, CFG on, median of {args.repeats} (interleaved):")
    print(f"  {'variant':12s} {'call':>8s} {'ratio':>7s} {'scale inference (probe + MLP)':>30s}")
    for name, ts in times.items():
        inf = statistics.median(inference[name])
        print(f"  {name:12s} {statistics.median(ts):7.3f}s {statistics.median(ts) / base:7.3f} "
              f"{inf:10.4f}s = {inf / base:.3f} of the unguarded call")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", choices=("train", "compare", "cost", "sweep"))
    ap.add_argument("--weights", type=pathlib.Path, default=None, help="shapes weights folder (default: packaged)")
    ap.add_argument("--concept", default="circle")
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--preserve-bound", type=float, default=0.6)
    ap.add_argument("--window", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 1.0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--adapter", default=str(OUT))
    ap.add_argument("--concepts", type=lambda s: s.split(","), default=["circle", "square", "star", "red", "blue", "striped"])
    ap.add_argument("--n", type=int, default=12, help="prompts with and without each concept")
    ap.add_argument("--small", type=float, default=0.5)
    ap.add_argument("--large", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2000, help="train: epochs of the MLP fit")
    ap.add_argument("--preserve", type=anchor_map, default={},
                    help="compare: anchors per concept, e.g. 'circle=square;red=green,purple': adds the large fixed "
                         "scale and the adapter with those anchors")
    ap.add_argument("--preserve-by", choices=("compete", "project", "both"), default="compete")
    ap.add_argument("--results", default=None, help="folder of compare's results (default: benchmarks/results)")
    ap.add_argument("--smoke", action="store_true",
                    help="train, compare, cost and sweep in miniature (4 steps, a few prompts), writing the adapter "
                         "and results into --results (default: a new temporary folder): checks it runs, measures nothing")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    commands = {"train": cmd_train, "compare": cmd_compare, "cost": cmd_cost, "sweep": cmd_sweep}
    if args.smoke:
        global STEPS
        STEPS = 4
        args.results = args.results or tempfile.mkdtemp(prefix="adapter-vs-fixed-")
        args.out = args.adapter = str(pathlib.Path(args.results) / "shapes-circle.safetensors")
        args.n_train, args.scales, args.n, args.concepts, args.repeats, args.epochs = 4, [0.5, 2.0], 2, ["circle"], 1, 200
        args.preserve = args.preserve or {"circle": ["square"]}
        for command in commands:  # train first: the others read its adapter
            print(f"-- {command} (smoke)", flush=True)
            commands[command](args)
        return
    args.results = args.results or str(REPO / "benchmarks" / "results")
    if args.command is None:
        ap.error("name a command (train, compare, cost, sweep) or give --smoke")
    commands[args.command](args)


if __name__ == "__main__":
    main()
