"""``gie-guard explain``: a concept's attention maps over the steps, unguarded and guarded
(gie_guard.explain), written as a PNG."""

from __future__ import annotations

import argparse

from ..errors import ConfigurationError
from .pipelines import add_pipeline_option

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    explain = commands.add_parser("explain", help="draw a concept's attention maps over the steps, unguarded and guarded")
    explain.add_argument("--prompt", required=True, help="the prompt to generate")
    explain.add_argument("--policy", default="shapes-demo", help="policy file or shipped name (default: shapes-demo)")
    explain.add_argument("--concept", help="concept id to draw (default: the policy's first)")
    explain.add_argument("--out", default="gie-guard-explain.png", help="where to write the PNG")
    explain.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    explain.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    explain.add_argument("--columns", type=int, default=8, help="steps shown (default: 8)")
    explain.add_argument("--sites", metavar="NAMES",
                         help="comma-separated attention sites to average, as the report names them or their "
                              "prefixes (e.g. transformer_blocks.1,transformer_blocks.2 on a transformer); "
                              "default: every site of the highest resolution")
    add_pipeline_option(explain, default="auto", backbone=True)
    explain.set_defaults(handler=_explain)


def _explain(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.columns < 1:
        raise ConfigurationError(f"--steps and --columns must be at least 1, got {args.steps} and {args.columns}")
    from ..logs import quiet_cli

    quiet_cli()  # before torch, diffusers and transformers load
    import torch
    from prometheus_client import CollectorRegistry

    from ..demo import demo_policy
    from ..explain import explain
    from ..guard import Guard
    from ..metrics import GuardMetrics
    from .pipelines import load_pipeline, pipeline_kind

    torch.set_num_threads(1)
    verifiers = {}
    if pipeline_kind(args.pipeline, args.weights, args.backbone) == "shapes":
        from ..detectors.shapes import ShapesDetector

        verifiers["shapes"] = ShapesDetector()  # for policies that verify with the toy detector
    # the policy first: a bad one is reported before seconds go into loading a model
    # shapes-demo on the transformer shapes model: its own measured scale and window (gie_guard.demo)
    guard = Guard(policy=demo_policy(args.policy, args.backbone), metrics=GuardMetrics(CollectorRegistry()),
                  verifiers=verifiers)  # a one-off: exports nothing
    loaded = load_pipeline(args.pipeline, weights=args.weights, tiny_size=32, backbone=args.backbone)
    sites = [x.strip() for x in args.sites.split(",") if x.strip()] if args.sites else None
    result = explain(loaded.pipe, guard, args.prompt, concept=args.concept, seed=args.seed, steps=args.steps,
                     columns=args.columns, sites=sites)  # a --sites name that matches no site: the error lists them
    result.figure.save(args.out)
    drop = 1.0 - float(result.maps_after.mean()) / max(float(result.maps_before.mean()), 1e-12)
    print(f"model: {loaded.description}")
    print(f"wrote {args.out}: concept {result.concept_id!r} (scale {result.scale:g}) over {args.steps} steps; "
          f"mean attention share {result.maps_before.mean():.4f} unguarded, {result.maps_after.mean():.4f} guarded "
          f"({drop:+.1%} lower)")
    return 0
