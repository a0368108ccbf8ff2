"""``gie-guard evaluate``: a policy's removal, preservation and cost on your own model
(gie_guard.evaluate, docs/evaluate.md).

    gie-guard evaluate --model ./sd-v1-4 --policy nsfw --unsafe i2p.csv --benign coco.csv \\
        --judge nudenet --out eval/nsfw [--policy other.yaml] [--limit N --seeds A:B|csv --steps S]
"""

from __future__ import annotations

import argparse
import pathlib
import shlex

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ev = commands.add_parser(
        "evaluate", help="measure a policy on a model: removal on unsafe prompts, preservation on benign ones, cost",
        description="Generate every prompt unguarded and guarded with the same seeds, judge both, and write "
                    "DIR/results.json, DIR/report.md and DIR/report.html. A rerun with the same --out skips finished "
                    "images. See docs/evaluate.md.",
    )
    ev.add_argument("--model", required=True, metavar="MODEL",
                    help="'shapes' (the shapes-world model), 'shapes-dit' (its transformer version, once packaged), a "
                         "local diffusers pipeline folder (offline, safetensors), or module:function")
    ev.add_argument("--policy", action="append", required=True, metavar="POLICY",
                    help="policy file or shipped name; repeat to compare policies on the same seeds")
    ev.add_argument("--unsafe", metavar="CSV", help="prompts the policy should act on (e.g. I2P)")
    ev.add_argument("--benign", metavar="CSV", help="prompts it should leave alone (e.g. COCO captions)")
    ev.add_argument("--judge", required=True, metavar="NAME",
                    help="detector judging the images: nudenet, shapes, a registered detector or module:attr")
    ev.add_argument("--out", required=True, type=pathlib.Path, metavar="DIR", help="output folder (reused to resume)")
    ev.add_argument("--unsafe-column", default="prompt", metavar="NAME", help="prompt column of --unsafe (default: prompt)")
    ev.add_argument("--benign-column", default="prompt", metavar="NAME", help="prompt column of --benign (default: prompt)")
    ev.add_argument("--unsafe-where", action="append", default=[], metavar="EXPR",
                    help="keep unsafe rows matching COLUMN OP VALUE (OP: = != < <= > >= ~contains), e.g. "
                         "'nudity_percentage>=50'; repeatable")
    ev.add_argument("--limit", type=int, metavar="N", help="first N prompts of each set")
    ev.add_argument("--benign-limit", type=int, metavar="N", help="first N prompts of the benign set (default: --limit)")
    ev.add_argument("--seeds", default="0:1", metavar="A:B|csv",
                    help="seeds A..B-1 for every prompt, or 'csv': the row's --seed-column (default: 0:1)")
    ev.add_argument("--seed-column", default="evaluation_seed", metavar="NAME",
                    help="seed column for --seeds csv (default: evaluation_seed)")
    ev.add_argument("--steps", type=int, help="denoising steps (default: 20 for the shapes models, else 50)")
    ev.add_argument("--guidance", type=float, help="guidance scale (default: 5 for the shapes models, else the pipeline's)")
    ev.add_argument("--device", default="auto", help="torch device (default: auto = cuda, mps or cpu)")
    ev.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (default: auto = float16 on a GPU for a folder)")
    ev.add_argument("--batch-size", type=int, help="images per pipeline call (default: 32 for the shapes models, else 1)")
    ev.add_argument("--label", action="append", default=[], metavar="LABEL",
                    help="judge label(s) meaning the policy's concepts (default: see docs/evaluate.md); repeatable")
    ev.add_argument("--clip", metavar="DIR", help="local CLIP model (open_clip or transformers folder): CLIP score on the benign set")
    ev.add_argument("--thumbnails", type=int, default=8, metavar="K", help="image pairs per section of report.html (default: 8)")
    ev.add_argument("--show-unsafe", action="store_true", help="do not blur judge-positive thumbnails in report.html")
    ev.add_argument("--keep-safety-checker", action="store_true",
                    help="keep a folder pipeline's safety checker (default: left out, it blacks out what the judge should see)")
    ev.add_argument("--threads", type=int, default=None, metavar="N",
                    help="torch CPU threads (default: torch's; 1 is fastest on a small shared machine)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from ..errors import ConfigurationError
    from ..logs import quiet_cli

    if args.threads is not None and args.threads < 1:
        raise ConfigurationError(f"--threads must be at least 1, got {args.threads}")
    quiet_cli()  # before torch, diffusers and transformers load
    from ..evaluate import EvaluateConfig, evaluate
    from ..evaluate.measures import fmt

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    config = EvaluateConfig(
        model=args.model, policies=args.policy, judge=args.judge, out=args.out, unsafe=args.unsafe, benign=args.benign,
        unsafe_column=args.unsafe_column, benign_column=args.benign_column, unsafe_where=args.unsafe_where,
        limit=args.limit, benign_limit=args.benign_limit, seeds=args.seeds, seed_column=args.seed_column,
        steps=args.steps, guidance=args.guidance, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        labels=args.label, clip=args.clip, thumbnails=args.thumbnails, show_unsafe=args.show_unsafe,
        keep_safety_checker=args.keep_safety_checker,
        progress=not args.no_progress, command=_command(args),
    )
    results = evaluate(config)
    for p in results["policies"]:
        parts = [f"policy {p['label']}:"]
        if "unsafe" in p:
            u = p["unsafe"]
            parts.append(f"removal {fmt(u['removal'])} ({u['removed']}/{u['positive_unguarded']}), "
                         f"residual {fmt(u['residual'])}")
        if "benign" in p:
            b = p["benign"]
            parts.append(f"benign MS-SSIM {fmt(b['ms_ssim_mean'])}, FP {fmt(b['false_positive_guarded'])}")
        parts.append(f"time ratio {fmt(p['cost']['time_ratio'])}")
        print(" ".join(parts[:1]) + " " + "; ".join(parts[1:]))
    run = results["run"]
    print(f"wrote {args.out}/results.json, report.md, report.html ({run['generated']} generated, {run['reused']} reused, "
          f"{run['wall_seconds']:.0f} s)")
    return 0


_OPTIONS = ("model", "policy", "unsafe", "benign", "judge", "out", "unsafe_column", "benign_column", "unsafe_where",
            "limit", "benign_limit", "seeds", "seed_column", "steps", "guidance", "device", "dtype", "batch_size",
            "label", "clip", "thumbnails", "show_unsafe", "keep_safety_checker", "threads")
_DEFAULTS = {"unsafe_column": "prompt", "benign_column": "prompt", "seeds": "0:1", "seed_column": "evaluation_seed",
             "device": "auto", "dtype": "auto", "thumbnails": 8}


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (options at their defaults left out)."""
    words = ["gie-guard", "evaluate"]
    for name in _OPTIONS:
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if value is None or value is False or value == [] or _DEFAULTS.get(name) == value:
            continue
        if value is True:
            words.append(flag)
        else:
            for v in value if isinstance(value, list) else [value]:
                words += [flag, str(v)]
    return shlex.join(words)
