"""What precision costs per call: preservation anchors (each mechanism) and presence gating,
as ratios to the unguarded call, on the shapes-world UNet at its real size.

In one process, interleaved round by round (round 0 warms every variant up and compiles its
plan), the same batch of prompts is generated:

- unguarded;
- GIE with one concept (the reference guard);
- GIE with ``--anchors N`` preservation anchors by ``compete``, ``project`` and ``both``
  (``--preserve-by`` picks some);
- GIE with presence gating (mode gate; the probe pass before step 0 costs one extra
  denoiser pass on the prompt rows); the threshold is tiny so the gate opens and the
  inhibitor's maths runs in every step, as in the worst case;
- GIE with anchors and the gate together (``--preserve-by``'s first mechanism).

Reported: median wall and CPU seconds per call over ``--repeats`` rounds, their ratios to the
unguarded call's medians, and the peak memory of the call above what was resident before it
(CPU: the process's peak resident set, reset before each call). The performance budget:
1.10x the unguarded call with one concept.

    python benchmarks/precision_cost.py                         # shapes UNet, batch 8, 20 steps
    python benchmarks/precision_cost.py --anchors 4 --preserve-by compete
    python benchmarks/precision_cost.py --smoke                 # seconds: checks it runs, measures nothing
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _common import markdown_table, median, peak_memory_mib, peak_memory_reset
from prometheus_client import CollectorRegistry

from gie_guard import Guard
from gie_guard.metrics import GuardMetrics

CONCEPT = "triangle"
ANCHOR_WORDS = ("star", "square", "circle", "cross", "pyramid", "box", "disc", "plus")  # the shapes world's neighbours
PROMPTS = ("a red triangle", "a blue star", "a green striped square", "a yellow circle", "a purple dotted cross",
           "a red star", "a blue triangle", "a green circle")


def policy(anchors: int = 0, preserve_by: str = "compete", gate: bool = False, scale: float = 2.0) -> dict:
    concept: dict = {"id": "c0", "text": CONCEPT, "scale": scale}
    doc: dict = {"name": "cost", "inhibit_steps": [0.0, 1.0], "dedup_threshold": 0.0, "concepts": [concept]}
    if anchors:
        concept["preserve"] = list(ANCHOR_WORDS[:anchors])
        doc["preserve_by"] = preserve_by
    if gate:  # a tiny threshold: the gate opens and every step runs the inhibitor (the worst case)
        doc["presence"] = {"mode": "gate", "threshold": 1e-6}
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="images per call (prompts cycle through a fixed list)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported); round 0 warms up")
    parser.add_argument("--anchors", type=int, default=1, help=f"anchors per concept (at most {len(ANCHOR_WORDS)})")
    parser.add_argument("--preserve-by", default="all", choices=("compete", "project", "both", "all"),
                        help="the anchor mechanisms to time ('all': each)")
    parser.add_argument("--backbone", default="unet", choices=("unet", "dit"), help="which shapes model")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: shared machines)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write DIR/results.md and results.json")
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU", help="machine description for results.md")
    parser.add_argument("--smoke", action="store_true", help="one image, one step, one round: seconds, measures nothing")
    args = parser.parse_args(argv)
    if not 1 <= args.anchors <= len(ANCHOR_WORDS):
        parser.error(f"--anchors must be 1..{len(ANCHOR_WORDS)}")
    if args.smoke:
        args.batch, args.steps, args.repeats = 1, 1, 1
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from gie_guard.shapes import load_pipeline

    pipe = load_pipeline(backbone=args.backbone)
    pipe.set_progress_bar_config(disable=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    settings = dict(prompt=prompts, num_inference_steps=args.steps, guidance_scale=5.0, output_type="latent")
    metrics = GuardMetrics(CollectorRegistry())  # the benchmark's own registry
    mechanisms = ["compete", "project", "both"] if args.preserve_by == "all" else [args.preserve_by]
    n = args.anchors
    guards = {"GIE, 1 concept": Guard(policy=policy(), metrics=metrics)}
    for mech in mechanisms:
        guards[f"GIE +anchors({mech}), {n} anchor{'s' * (n > 1)}"] = Guard(policy=policy(n, mech), metrics=metrics)
    guards["GIE +gate (probe pass)"] = Guard(policy=policy(gate=True), metrics=metrics)
    guards[f"GIE +anchors({mechanisms[0]}) +gate"] = Guard(policy=policy(n, mechanisms[0], gate=True), metrics=metrics)
    variants = {"unguarded": pipe, **{k: (lambda g=g, **kw: g(pipe, **kw)) for k, g in guards.items()}}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    peak: dict[str, float] = {}
    dev = torch.device("cpu")
    with torch.no_grad():
        for rep in range(args.repeats + 1):
            for name, run in variants.items():
                base = peak_memory_reset(dev)
                t0, c0 = time.perf_counter(), time.process_time()
                run(generator=[torch.Generator().manual_seed(rep * 100 + i) for i in range(args.batch)], **settings)
                if rep:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
                    peak[name] = max(peak.get(name, 0.0), peak_memory_mib(dev) - base)
                print(f"  round {rep} {name}: {time.perf_counter() - t0:.2f}s", file=sys.stderr, flush=True)
    w0, c0, m0 = median(wall["unguarded"]), median(cpu["unguarded"]), peak["unguarded"]
    results = [dict(variant=k, wall_s=median(wall[k]), wall_ratio=median(wall[k]) / w0, cpu_s=median(cpu[k]),
                    cpu_ratio=median(cpu[k]) / c0, peak_mib=peak[k], walls=wall[k], cpus=cpu[k]) for k in variants]
    rows = [(r["variant"], f"{r['wall_s']:.3f}", f"{r['wall_ratio']:.3f}", f"{r['cpu_s']:.3f}", f"{r['cpu_ratio']:.3f}",
             f"{r['peak_mib']:.0f}", f"{r['peak_mib'] / m0:.2f}" if m0 >= 1 else "n/a") for r in results]
    command = "python benchmarks/precision_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = (f"# What precision costs per call\n\ncommand: `{command}`\n\n"
            f"wall {(time.perf_counter() - t_start) / 60:.1f} min, {time.strftime('%Y-%m-%d')}, machine: {args.machine}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n\n"
            f"shapes-world {args.backbone} model at its real size, batch {args.batch} ({args.batch * 2} rows with CFG), "
            f"{args.steps} steps a call, latents out (no VAE decode), concept {CONCEPT!r} at w=2 in every step, "
            f"anchors: {', '.join(ANCHOR_WORDS[:n])}; median of {args.repeats} interleaved rounds"
            + (" (smoke run: nothing measured)" if args.smoke else "") + "\n\n")
    text = head + markdown_table(("variant", "wall s / call", "wall ratio", "CPU s / call", "CPU ratio",
                                  "call peak MiB", "memory ratio"), rows) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(text)
        (args.out / "results.json").write_text(json.dumps(dict(command=command, machine=args.machine, batch=args.batch,
                                                               steps=args.steps, anchors=list(ANCHOR_WORDS[:n]),
                                                               results=results), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
