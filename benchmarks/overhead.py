"""What the guard costs per generation, family by family, on denoisers of production width.

For one family, a pipeline with the production model's width (benchmarks/_common.py
REAL_WIDTHS; transformer depth reduced to fit this machine, which scales guarded and
unguarded steps alike), random weights, is called unguarded and guarded with 1 and 8
concepts (window 0-1, every step inhibited), interleaved in one process; each call runs
``--steps`` denoising steps and stops at the latents (the VAE is not part of the guard).
Reported: median wall and CPU seconds per call, their ratios to the unguarded call, and the
peak memory of the call above what was resident before it, with its ratio.

A fourth variant separates the engine's bookkeeping from its maths: the engine installed
with a concept at scale 0 in the plan's place (hooks, step clock, row matching, invariant
checks, no inhibitor attention).

    python benchmarks/overhead.py --family unet            # SD 1.5 UNet, 256 px: ~10 min here
    python benchmarks/overhead.py --family flux --size 256
    python benchmarks/overhead.py --smoke                   # every family, tiny, seconds (CI)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from gie_guard.logs import quiet_cli

# The benchmark owns its process and prints a table: diffusers' and transformers' notices
# (deprecations, "clean_caption requires Beautiful Soup", "requires torchvision") are not
# its output. quiet_cli() before they are imported; their deprecations are FutureWarnings.
quiet_cli()
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import torch  # noqa: E402
from _common import (  # noqa: E402
    REAL_WIDTHS,
    call_settings,
    concept_policy,
    markdown_table,
    median,
    peak_memory_mib,
    peak_memory_reset,
    real_width_pipeline,
    tiny_pipeline,
)

from gie_guard import Guard  # noqa: E402
from gie_guard.engine import StepWindow, compile_plan, guarded_call  # noqa: E402
from gie_guard.metrics import GuardMetrics  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402


def _bookkeeping(pipe):
    """A call through the engine with every hook and check but no inhibitor maths."""
    from gie_guard.engine import ConceptSpec

    plan = compile_plan(pipe, [ConceptSpec("c0", "nude", 3.0)], StepWindow(0.0, 1.0))

    def call(**kwargs):
        with guarded_call(pipe, plan, inhibit=False):
            return pipe(**kwargs)

    return call


def measure(family: str, size: int, steps: int, repeats: int, concepts: list[int], device: str, dtype: str,
            smoke: bool = False, maps: tuple[str, ...] = ()) -> str:
    dev = torch.device(device)
    if smoke:
        pipe, base_settings = tiny_pipeline(family)
    else:
        pipe = real_width_pipeline(family, size, device=device, dtype=getattr(torch, dtype))
        base_settings = call_settings(family, size)
    settings = dict(base_settings, num_inference_steps=steps, prompt="a photo of a person on a beach")
    metrics = GuardMetrics(registry=CollectorRegistry())  # the benchmark's own, not the process's
    variants = {"unguarded": pipe}
    for c in concepts:
        guard = Guard(policy=concept_policy(c), metrics=metrics)
        variants[f"gie_guard, {c} concept{'s' if c > 1 else ''}"] = lambda guard=guard, **kw: guard(pipe, **kw)
        for concept_map in maps:  # the specificity options, at the same concept count
            guard = Guard(policy=concept_policy(c), metrics=metrics, concept_map=concept_map)
            variants[f"gie_guard, {c} concept{'s' if c > 1 else ''}, {concept_map} map"] = (
                lambda guard=guard, **kw: guard(pipe, **kw))
    variants["engine bookkeeping only"] = _bookkeeping(pipe)
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    peak: dict[str, float] = {}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for rep in range(repeats + 1):  # round 0 warms every variant up (and compiles the plans)
            for name, run in variants.items():
                base = peak_memory_reset(dev)
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                run(generator=torch.Generator().manual_seed(rep), **settings)
                sync()
                if rep:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
                    peak[name] = max(peak.get(name, 0.0), peak_memory_mib(dev) - base)
                print(f"  {family} round {rep} {name}: {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    w0, c0, m0 = median(wall["unguarded"]), median(cpu["unguarded"]), peak["unguarded"]
    rows = [
        (name, f"{median(wall[name]):.3f}", f"{median(wall[name]) / w0:.3f}", f"{median(cpu[name]):.3f}",
         f"{median(cpu[name]) / c0:.3f}", f"{peak[name]:.0f}", f"{peak[name] / m0:.2f}" if m0 >= 1 else "n/a")
        for name in variants
    ]
    what = "tiny random pipeline (smoke run: nothing measured)" if smoke else REAL_WIDTHS[family]
    head = (f"**{family}** ({what}), {size} px, {steps} steps a call, {device} {dtype}, "
            f"median of {repeats}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n\n")
    return head + markdown_table(
        ("variant", "wall s / call", "wall ratio", "CPU s / call", "CPU ratio", "call peak MiB", "memory ratio"), rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="unet", choices=sorted(REAL_WIDTHS) + ["all"])
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latents are size/8)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--concepts", default="1,8")
    parser.add_argument("--maps", default="", help="comma-separated concept_map options to time beside gie "
                        "(calibrated, gated, output)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: shared machines)")
    parser.add_argument("--smoke", action="store_true", help="every family's tiny pipeline, one repeat: seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    families = sorted(REAL_WIDTHS) if args.family == "all" or args.smoke else [args.family]
    if args.smoke:
        args.size, args.repeats, args.steps = 16, 1, 1
    concepts = [int(x) for x in args.concepts.split(",")]
    for family in families:
        print(measure(family, args.size, args.steps, args.repeats, concepts, args.device, args.dtype, args.smoke,
                      tuple(m for m in args.maps.split(",") if m)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
