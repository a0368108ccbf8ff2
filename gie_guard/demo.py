"""The README's main job: one prompt generated unguarded and guarded with the same seed,
side by side in one PNG, and the guard's report printed."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from PIL import Image


def _demo_pipeline() -> tuple[Any, str]:
    from .testing import tiny_sd_pipeline

    return tiny_sd_pipeline(sample_size=32), "a tiny random-weight SD 1.x pipeline (gie_guard.testing)"


def side_by_side(before: Image.Image, after: Image.Image, *, zoom: int = 4) -> Image.Image:
    w, h = before.size
    grid = Image.new("RGB", (2 * w * zoom + zoom, h * zoom), "white")
    grid.paste(before.resize((w * zoom, h * zoom), Image.NEAREST), (0, 0))
    grid.paste(after.resize((w * zoom, h * zoom), Image.NEAREST), (w * zoom + zoom, 0))
    return grid


def main(args: argparse.Namespace) -> int:
    from .guard import Guard

    pipe, description = _demo_pipeline()
    guard = Guard(policy=args.policy)
    prompt = args.prompt
    call = dict(prompt=prompt, num_inference_steps=20, guidance_scale=7.5)
    before = pipe(**call, generator=torch.Generator().manual_seed(args.seed)).images[0]
    after = guard(pipe, **call, generator=torch.Generator().manual_seed(args.seed)).images[0]
    side_by_side(before, after).save(args.out)
    report = guard.last_report
    changed = float(np.abs(np.asarray(before, float) - np.asarray(after, float)).mean())
    print(f"model: {description}")
    print(f"prompt: {prompt!r}  seed: {args.seed}")
    print(f"wrote {args.out} (left: unguarded, right: guarded; mean pixel change {changed:.2f}/255)")
    print("report:", json.dumps(asdict(report), indent=2))
    return 0
