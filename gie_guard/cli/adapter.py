"""``gie-guard adapter train|inspect``: train and inspect scale adapters.

    gie-guard adapter train --pipeline shapes --prompts prompts.txt --concept circle \\
        --category object --scales 5,10,20,40 --judge shapes --out adapters/shapes-circle.safetensors
    gie-guard adapter inspect FILE
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from .pipelines import add_pipeline_option

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    adapter = commands.add_parser("adapter", help="train and inspect scale adapters (scale: auto)")
    sub = adapter.add_subparsers(dest="adapter_command", metavar="SUBCOMMAND", required=True)

    train = sub.add_parser("train", help="label prompts with a judge at a grid of scales and fit an adapter")
    add_pipeline_option(train)
    train.add_argument("--prompts", required=True, metavar="FILE", help="prompt list, one per line ('#' comments)")
    train.add_argument("--concept", required=True, help="the concept text to erase")
    train.add_argument("--category", default="object", help="category the adapter serves (default: object)")
    train.add_argument("--scales", required=True, type=_numbers(), help="scale grid, comma-separated (e.g. 5,10,20,40)")
    train.add_argument("--judge", required=True, help="'shapes', 'nudenet' or module:attr")
    train.add_argument("--preservation", default=None,
                       help="'shapes', 'pixel' or module:attr (default: the judge's own, else pixel)")
    train.add_argument("--preserve-bound", type=float, default=0.75, help="minimum preservation score (default 0.75)")
    train.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    train.add_argument("--report", default=None, help="training report (JSON; default: next to --out)")
    train.add_argument("--name", default=None, help="adapter name (default: the concept)")
    train.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    train.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default 5)")
    train.add_argument("--window", default=(0.0, 1.0), type=_numbers(2),
                       help="inhibited fraction of the steps, start,end (default 0,1)")
    train.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed+i")
    train.add_argument("--epochs", type=int, default=2000, help="training epochs (default 2000)")
    train.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default 16)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)

    inspect = sub.add_parser("inspect", help="print an adapter file's metadata")
    inspect.add_argument("file")
    inspect.set_defaults(handler=_inspect)


def _numbers(count: int | None = None) -> Callable[[str], tuple[float, ...]]:
    """An argparse type: comma-separated numbers (exactly ``count`` of them when given)."""
    def parse(text: str) -> tuple[float, ...]:
        try:
            numbers = tuple(float(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if count is not None and len(numbers) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}")
        return numbers

    return parse


def _read_prompts(path: str) -> list[str]:
    from ..errors import ConfigurationError
    from ..policy.files import FileProblem, read_regular_file  # refuses FIFOs and devices before opening

    try:
        lines = read_regular_file(path, limit=16 * 1024 * 1024).decode("utf-8").splitlines()
    except FileProblem as exc:
        raise ConfigurationError(f"{path}: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"{path}: not UTF-8 text") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _train(args: argparse.Namespace) -> int:
    from ..logs import quiet_cli

    quiet_cli()  # before torch, diffusers and transformers load
    from ..adapters.judges import load_judge, preservation_for
    from ..adapters.training import TrainingConfig, train_adapter
    from .pipelines import load_pipeline

    prompts = _read_prompts(args.prompts)
    config = TrainingConfig(
        concept=args.concept, category=args.category, scales=args.scales, name=args.name, steps=args.steps,
        guidance_scale=args.guidance, window=args.window, preserve_bound=args.preserve_bound, seed=args.seed,
        epochs=args.epochs, batch_size=args.batch_size,
    )
    judge = load_judge(args.judge)
    preservation = preservation_for(judge, args.preservation)
    pipe = load_pipeline(args.pipeline, weights=args.weights).pipe
    report_path = args.report or str(Path(args.out).with_suffix(".json"))
    adapter, report = train_adapter(
        pipe, prompts, config, judge, preservation, out=args.out, report_path=report_path,
        progress=not args.no_progress, judge_name=args.judge,
    )
    s = report["summary"]
    print(f"wrote {adapter.path} ({adapter.label}) and {report_path}")
    print(f"  {s['prompts']} prompts, labels by rule {s['label_rules']}, per scale {s['label_counts']}")
    if s["validation"]:
        v = s["validation"]
        print(f"  held-out MAE {v['mae']:.2f} (constant mean label: {v['mae_of_constant_mean_label']:.2f})")
    print(f"  labelling {s['labelling_seconds']} s, fitting {s['fitting_seconds']} s")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ..adapters.format import read_header

    header = read_header(args.file)
    meta = dict(header.meta)
    fp = meta.pop("fingerprint")
    print(f"{header.path}: adapter {header.name!r}, format {meta.pop('format_version')}")
    print(f"  fingerprint {header.fingerprint.digest[:12]}: {fp['layer_count']} cross-attention layers, "
          f"text width {sorted(set(fp['cross_attention_dims']))}")
    print(json.dumps(meta, indent=1))
    return 0
