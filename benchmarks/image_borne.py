"""Image-borne concepts: is a concept inhibited when it comes from the input image of an
img2img call and the prompt does not name it?

GIE's map compares the image's queries with the concept's keys, independently of the prompt,
so in principle a concept present in the input image is inhibited too. Per backbone of the
shapes world: for each seed, the unguarded text-to-image model draws "a red {target}"; the
images whose detector finds the target are the inputs. Each input is then redrawn by img2img
with a prompt that does not name it ("a red thing") at ``--strength``, unguarded and guarded
with the target erased under each ``--maps`` option (scale and window as given). Reported per
option: the share of inputs whose target survives (detected in the output), and the share of
inputs whose other attributes (colour, style) survive, against the unguarded img2img.

``--world two`` asks the same of a concept beside other content, on the two-cell models: the
inputs are the unguarded images of the specificity benchmark's placed pair prompts ("a red
circle on the left and a blue square on the right") that show the target in one cell and the
``--other`` attribute in the other; the img2img prompt says the target's thing without its
word ("a red thing on the left and a blue square on the right"; a colour or style target is
left unsaid). Reported per option: the share of inputs whose target survives anywhere; its
removal among the inputs whose unguarded img2img still shows the target (the prompt alone
redraws some of them); and "other kept": the share whose other thing's cell holds exactly what
the unguarded img2img drew there.

    python benchmarks/image_borne.py --backbone unet --target circle --seeds 0:12 --scale 3 \\
        --maps gie,calibrated --out DIR
    python benchmarks/image_borne.py --world two --backbone dit --target circle --other square \\
        --seeds 0:24 --scale 4 --maps gie,calibrated,output --out DIR
    python benchmarks/image_borne.py --smoke --out DIR   # seconds (CI)

Writes DIR/results.json and DIR/results.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from _common import write_results  # noqa: E402

from gie_guard import Guard  # noqa: E402
from gie_guard.shapes import load_pipeline  # noqa: E402
from gie_guard.shapes import specificity as S  # noqa: E402
from gie_guard.shapes.detector import detect_cells, load_detector  # noqa: E402
from gie_guard.shapes.world_two import HEIGHT, WIDTH  # noqa: E402

STEPS = 20
GUIDANCE = 5.0


def img2img_of(pipe, backbone: str):
    """The img2img pipeline over the same components (same weights, no copy)."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusionImg2ImgPipeline

    cls = StableDiffusionImg2ImgPipeline if backbone == "unet" else StableDiffusion3Img2ImgPipeline
    components = {k: v for k, v in pipe.components.items() if k in cls._get_signature_keys(cls)[0] or k in
                  ("safety_checker", "feature_extractor")}
    extra = {"requires_safety_checker": False} if backbone == "unet" else {}
    # the constructor compares unet.config.sample_size < 64, a TypeError for the two-cell UNet's
    # rectangular (8, 16); it is read only there, so the config holds an int while it is built
    unet = components.get("unet")
    rectangle = unet.config.sample_size if unet is not None else None
    if isinstance(rectangle, (list, tuple)):
        unet.register_to_config(sample_size=max(rectangle))
    try:
        out = cls(**components, **extra)
    finally:
        if isinstance(rectangle, (list, tuple)):
            unet.register_to_config(sample_size=rectangle)
    out.set_progress_bar_config(disable=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="unet", choices=("unet", "dit"))
    parser.add_argument("--world", default="one", choices=("one", "two"),
                        help="one: one thing per image; two: the two-cell models, the target beside --other")
    parser.add_argument("--target", default="circle")
    parser.add_argument("--other", default=None, help="the other thing's attribute (--world two; default: the "
                        "target's first sibling)")
    parser.add_argument("--seeds", default="0:12")
    parser.add_argument("--scale", type=float, default=None, help="GIE scale (required unless --smoke)")
    parser.add_argument("--window", default="0,1")
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--maps", default="gie,calibrated")
    parser.add_argument("--references", default=None,
                        help="reference texts of the specific maps, comma-separated, or 'siblings' (the target's); "
                             "default: the engine's (thing, object, picture)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="two seeds, 4 steps, gie and calibrated: seconds (CI)")
    args = parser.parse_args(argv)
    global STEPS
    if args.smoke:
        STEPS, args.seeds, args.scale, args.maps = 4, "0:2", 2.0, "gie,calibrated"
    if args.scale is None:
        parser.error("--scale is required")
    torch.set_num_threads(args.threads)
    start, end = (int(x) for x in args.seeds.split(":"))
    window = [float(x) for x in args.window.split(",")]
    t0 = time.perf_counter()
    if args.world == "two":
        return _two_cells(args, argv, list(range(start, end)), window, t0)
    pipe = load_pipeline(backbone=args.backbone)
    pipe.set_progress_bar_config(disable=True)
    detector = load_detector()
    seeds = list(range(start, end))

    def draw(call, **kw) -> np.ndarray:
        """(S, 32, 32, 3) uint8 images, one per seed."""
        return np.stack([call(num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                              generator=torch.Generator().manual_seed(s), **{k: (v[i] if isinstance(v, list) else v)
                                                                              for k, v in kw.items()}).images[0]
                         for i, s in enumerate(seeds)]).__mul__(255).round().astype(np.uint8)

    sources = draw(pipe, prompt=f"a red {args.target}")
    found = detector(sources)
    inputs = [i for i, f in enumerate(found) if args.target in f]
    if not inputs:
        parser.error(f"no unguarded image of 'a red {args.target}' shows it on seeds {args.seeds}: nothing to measure")
    seeds = [seeds[i] for i in inputs]
    images = [Image.fromarray(sources[i]) for i in inputs]
    i2i = img2img_of(pipe, args.backbone)
    prompt = "a red thing"
    plain = draw(i2i, prompt=prompt, image=images, strength=args.strength)
    plain_found = detector(plain)
    rows = [{"map": "unguarded", "target_survives": float(np.mean([args.target in f for f in plain_found])),
             "n": len(seeds)}]
    for concept_map in _maps(args):
        guard = _guard(args, concept_map, window)
        guarded = draw(lambda **kw: guard(i2i, **kw), prompt=prompt, image=images, strength=args.strength)
        after = detector(guarded)
        others = [(p - {args.target}, a - {args.target}) for p, a in zip(plain_found, after)]
        rows.append({"map": concept_map, "target_survives": float(np.mean([args.target in f for f in after])),
                     "others_kept": float(np.mean([p <= a for p, a in others])) if others else float("nan"),
                     "n": len(seeds)})
        print(f"[{time.perf_counter() - t0:6.0f}s] {concept_map}: {rows[-1]}", file=sys.stderr, flush=True)
    md = [f"# Image-borne concepts ({args.backbone}, target {args.target!r})\n",
          f"inputs: unguarded 'a red {args.target}' images that show it, seeds {start}:{end} ({len(seeds)} kept); "
          f"img2img prompt {prompt!r}, strength {args.strength}, {STEPS} steps, guidance {GUIDANCE}; erased at scale "
          f"{args.scale:g}, window {window}, references {args.references or 'the engine default'}; command: `python benchmarks/image_borne.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`; {time.strftime('%Y-%m-%d')}\n",
          "| map | target survives | other attributes kept | n |", "|---|---|---|---|"]
    md += [f"| {r['map']} | {r['target_survives']:.2f} | {r.get('others_kept', float('nan')):.2f} | {r['n']} |"
           for r in rows]
    write_results(args.out, rows, md)
    return 0


def _maps(args: argparse.Namespace) -> list[str]:
    return [m.strip() for m in args.maps.split(",") if m.strip()]


def _guard(args: argparse.Namespace, concept_map: str, window: list[float]) -> Guard:
    """A guard erasing the target at ``--scale`` with ``concept_map`` and ``--references``."""
    policy = {"name": "image-borne", "inhibit_steps": window, "dedup_threshold": 0.0,
              "concepts": [{"id": "target", "text": args.target, "scale": args.scale}]}
    references: dict[str, list[str]] = {}
    if args.references == "siblings":
        references["references"] = list(S.siblings(args.target))
    elif args.references is not None:
        references["references"] = [r.strip() for r in args.references.split(",") if r.strip()]
    return Guard(policy=policy, concept_map=concept_map, exclusive=False, **references)


def _two_cells(args: argparse.Namespace, argv: list[str] | None, seeds: list[int], window: list[float],
               t0: float) -> int:
    """--world two: the target beside another thing, each in its own cell."""
    other = args.other or S.siblings(args.target)[0]
    S.kind_of(args.target), S.kind_of(other)  # refuses unknown words
    pipe = load_pipeline(world="two", backbone=args.backbone)
    pipe.set_progress_bar_config(disable=True)
    detector = load_detector()

    def cells(call, prompts: list[str], seeds: list[int], **kw) -> tuple[list[S.Cells], np.ndarray]:
        out = call(prompt=prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images
        return detect_cells(detector, np.round(out * 255).astype(np.uint8)), out

    sources, pictures = cells(pipe, [S.placed_pair(args.target, other, s) for s in seeds], seeds, height=HEIGHT,
                              width=WIDTH)
    others = [S.pair_things(args.target, other, s)[1] for s in seeds]
    keep = [i for i, c in enumerate(sources)
            if S.shows(c, args.target) and S.other_cell(c, other, others[i], args.target) is not None]
    if not keep:
        raise SystemExit(f"no unguarded placed pair image shows both {args.target!r} and {other!r} on seeds "
                         f"{args.seeds}: nothing to measure")
    seeds, others = [seeds[i] for i in keep], [others[i] for i in keep]
    images = [Image.fromarray(np.round(pictures[i] * 255).astype(np.uint8)) for i in keep]
    prompts = [S.placed_pair(args.target, other, s, name_target=False) for s in seeds]
    i2i = img2img_of(pipe, args.backbone)
    size = {"height": HEIGHT, "width": WIDTH} if args.backbone == "dit" else {}  # SD3 img2img resizes to its default
    plain, _ = cells(i2i, prompts, seeds, image=images, strength=args.strength, **size)
    rows = [{"map": "unguarded", "target_survives": float(np.mean([S.shows(c, args.target) for c in plain])),
             "n": len(seeds)}]
    for concept_map in _maps(args):
        guard = _guard(args, concept_map, window)
        after, _ = cells(lambda **kw: guard(i2i, **kw), prompts, seeds, image=images, strength=args.strength, **size)
        kept, eligible = S.other_kept(plain, after, others, other, args.target)
        removed, survivors = S.removal(plain, after, args.target)
        rows.append({"map": concept_map, "target_survives": float(np.mean([S.shows(c, args.target) for c in after])),
                     "removal": removed, "removal_n": survivors, "other_kept": kept, "other_n": eligible,
                     "n": len(seeds)})
        print(f"[{time.perf_counter() - t0:6.0f}s] {concept_map}: {rows[-1]}", file=sys.stderr, flush=True)
    md = [f"# Image-borne concepts beside other content (two-cell {args.backbone}, target {args.target!r}, "
          f"other {other!r})\n",
          f"inputs: unguarded placed pair images that show both, seeds {args.seeds} ({len(seeds)} kept); img2img "
          f"prompt without the target's word (e.g. {prompts[0]!r}), strength {args.strength}, {STEPS} steps, "
          f"guidance {GUIDANCE}; erased at scale {args.scale:g}, window {window}, references "
          f"{args.references or 'the engine default'}; command: `python "
          f"benchmarks/image_borne.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
          f"{time.strftime('%Y-%m-%d')}\n",
          "| map | target survives | removal (of the inputs whose target the unguarded img2img keeps) | other kept "
          "(its cell as unguarded img2img drew it) | n |", "|---|---|---|---|---|"]
    md += [f"| {r['map']} | {r['target_survives']:.2f} | "
           + (f"{r['removal']:.2f} ({r['removal_n']}) | {r['other_kept']:.2f} ({r['other_n']})" if "other_kept" in r
              else "- | -") + f" | {r['n']} |" for r in rows]
    write_results(args.out, rows, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
