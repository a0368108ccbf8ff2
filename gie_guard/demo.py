"""The README's main job: one prompt on the trained shapes-world model, generated unguarded
and guarded with the same seed, side by side in one PNG, with the guard's report and what
the shapes detector finds in each image."""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image


def side_by_side(before: Image.Image, after: Image.Image, *, zoom: int = 6) -> Image.Image:
    w, h = before.size
    grid = Image.new("RGB", (2 * w * zoom + zoom, h * zoom), "white")
    grid.paste(before.resize((w * zoom, h * zoom), Image.NEAREST), (0, 0))
    grid.paste(after.resize((w * zoom, h * zoom), Image.NEAREST), (w * zoom + zoom, 0))
    return grid


def main(args: argparse.Namespace) -> int:
    from .guard import Guard
    from .shapes import load_detector, load_pipeline

    torch.set_num_threads(1)  # one thread is fastest for this small model on a shared CPU
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    guard = Guard(policy=args.policy)
    call = dict(prompt=args.prompt, num_inference_steps=20, guidance_scale=5.0)
    before = pipe(**call, generator=torch.Generator().manual_seed(args.seed)).images[0]
    after = guard(pipe, **call, generator=torch.Generator().manual_seed(args.seed)).images[0]
    side_by_side(before, after).save(args.out)
    report = guard.last_report
    found_before, found_after = load_detector()([before, after])
    changed = float(np.abs(np.asarray(before, float) - np.asarray(after, float)).mean())
    print("model: the shapes-world model (gie_guard.shapes, trained in this project)")
    print(f"prompt: {args.prompt!r}  seed: {args.seed}  policy: {report.policy_name}")
    print(f"wrote {args.out} (left: unguarded, right: guarded; mean pixel change {changed:.1f}/255)")
    print(f"detector, unguarded: {', '.join(sorted(found_before)) or '-'}")
    print(f"detector, guarded:   {', '.join(sorted(found_after)) or '-'}")
    print(f"steps inhibited: {len(report.steps_inhibited)} of {report.total_steps} (window {report.step_window})")
    for c in report.concepts:
        attention = f"{c.attention:.3f}" if c.attention is not None else "-"
        print(f"  concept {c.id!r} ({c.text!r}): scales {c.token_scales} from {c.scale_source}, first-step attention {attention}")
    print(f"guard added {report.added_seconds * 1000:.0f} ms of {report.call_seconds * 1000:.0f} ms")
    return 0
