"""``gie-guard demo``: one prompt unguarded and guarded, side by side (gie_guard.demo)."""

from __future__ import annotations

import argparse

from ..errors import ConfigurationError
from .pipelines import add_pipeline_option

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser("demo", help="generate one prompt unguarded and guarded, side by side")
    demo.add_argument("--prompt", default="a red circle", help="the prompt to generate (default: a red circle)")
    demo.add_argument("--policy", default="shapes-demo",
                      help="policy file or shipped name (default: shapes-demo; with --backbone dit at the transformer "
                           "model's measured scale 2 over every step)")
    demo.add_argument("--out", default="gie-guard-demo.png", help="where to write the PNG (default: gie-guard-demo.png)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    demo.add_argument("--zoom", type=int, default=8, help="enlargement of the images in the PNG (default: 8)")
    add_pipeline_option(demo, default="shapes", backbone=True)
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.zoom < 1:
        raise ConfigurationError("--steps and --zoom must be at least 1")
    from ..logs import quiet_cli

    quiet_cli()  # before torch, diffusers and transformers load
    from .. import demo

    return demo.main(args)
