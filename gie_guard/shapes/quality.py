"""Quality gate of the shapes model, judged by the detector, and its attention profile.

    python -m gie_guard.shapes.quality [--n 200] [--weights DIR] [--backbone unet|dit] [--variant sink-pads]

Prints, for unguarded generations at fixed seeds, how often the prompted shape, colour
and style are detected, the same for prompts that use held-out synonyms, the detector's
own accuracy on fresh renders, and the share of cross-attention each token position
receives (the start token should take most of it, as in Stable Diffusion). With
`--backbone dit` (the transformer model) the same gate, then the joint-attention profile
(dit_attention.py): shares per key class, locality, text-stream leak and the route test.
`--variant sink-pads` measures the sink-pads UNet variant (weights/sink-pads/, or --weights DIR
holding its unet, sink and model.json) with the shipped detector.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

import numpy as np
import torch

from .detector import Detector, attribute_accuracy, load_detector, render_labelled
from .model import load_pipeline
from .world import HELD_OUT_WORDS, SHAPES, COLOURS, STYLES, TRAIN_WORDS, Thing

GATE = {"shape": 0.85, "colour": 0.85, "style": 0.70, "held-out": 0.60}
GUIDANCE = 5.0
STEPS = 20


def prompt_for(thing: Thing, rng: np.random.Generator, held_out: str | None = None) -> str:
    """"a {colour} [{style}] {shape}" with training words, except `held_out`'s attribute."""

    def word(attr: str) -> str:
        table = HELD_OUT_WORDS if attr == held_out else TRAIN_WORDS
        return table[attr][rng.integers(len(table[attr]))]

    style = "" if thing.style == "plain" else word(thing.style) + " "
    return f"a {word(thing.colour)} {style}{word(thing.shape)}"


@torch.no_grad()
def generate(pipe: Any, prompts: list[str], seed: int, batch: int = 25) -> np.ndarray:
    """(N, 32, 32, 3) uint8; image i uses generator seed `seed + i`."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(seed + j) for j in range(i, min(i + batch, len(prompts)))]
        images = pipe(prompts[i : i + batch], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      generator=gens, output_type="np").images
        out.append(np.round(images * 255).astype(np.uint8))
    return np.concatenate(out)


def quality_gate(pipe: Any, detector: Detector, n: int = 200, seed: int = 0) -> dict[str, tuple[float, int]]:
    """Detection rate of the prompted attributes: {row: (rate, number of prompts)}."""
    rng = np.random.default_rng(seed)
    things = [Thing(SHAPES[rng.integers(5)], COLOURS[rng.integers(5)], STYLES[rng.integers(3)]) for _ in range(n)]
    found = detector(generate(pipe, [prompt_for(t, rng) for t in things], seed))
    rows = {
        kind: (float(np.mean([getattr(t, kind) in f for t, f in zip(things, found)])), n)
        for kind in ("shape", "colour", "style")
    }
    # held-out synonyms: one attribute per prompt named by its held-out word
    held = [a for a in HELD_OUT_WORDS]
    attrs = [held[i % len(held)] for i in range(n // 2)]
    held_things = [
        Thing(a if a in SHAPES else SHAPES[rng.integers(5)], a if a in COLOURS else COLOURS[rng.integers(5)],
              STYLES[rng.integers(3)])
        for a in attrs
    ]
    prompts = [prompt_for(t, rng, held_out=a) for t, a in zip(held_things, attrs)]
    found = detector(generate(pipe, prompts, seed + n))
    hits = np.array([a in f for a, f in zip(attrs, found)])
    rows["held-out"] = (float(hits.mean()), len(attrs))
    for a in held:
        sel = [i for i, x in enumerate(attrs) if x == a]
        rows[f"  {HELD_OUT_WORDS[a][0]} ({a})"] = (float(hits[sel].mean()), len(sel))
    return rows


class _RecordingProcessor:
    """Plain cross-attention that also records the attention each token receives."""

    def __init__(self, records: list[torch.Tensor]):
        self.records = records

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        b = hidden_states.shape[0]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, N, d)
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B*heads, T, d)
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, attention_mask)  # (B*heads, N, T)
        self.records.append(probs.view(b, attn.heads, *probs.shape[1:]).mean(dim=1))  # (B, N, T)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        projected: torch.Tensor = attn.to_out[1](attn.to_out[0](out))
        return projected


@torch.no_grad()
def _record(pipe: Any, prompt: str, seed: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """Cross-attention maps (N, T) of the conditional row, for every layer call in UNet
    order and every step, and the generated image (32, 32, 3) uint8."""
    records: list[torch.Tensor] = []
    saved = pipe.unet.attn_processors
    pipe.unet.set_attn_processor({
        name: _RecordingProcessor(records) if name.endswith("attn2.processor") else proc
        for name, proc in saved.items()
    })
    try:
        image = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                     generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    finally:
        pipe.unet.set_attn_processor(saved)
    return [r[-1] for r in records], np.round(image * 255).astype(np.uint8)  # last row: conditional


def _tokens(pipe: Any, prompt: str) -> list[str]:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids
    tokens: list[str] = pipe.tokenizer.convert_ids_to_tokens(ids)
    return tokens


def token_attention(pipe: Any, prompt: str, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Tokens of `prompt` (77) and the mean cross-attention each receives, averaged over
    all cross-attention layers, heads, pixels and denoising steps, conditional rows only."""
    maps, _ = _record(pipe, prompt, seed)
    share = torch.stack([m.mean(0) for m in maps]).mean(0).numpy()
    return _tokens(pipe, prompt), share


def concept_locality(pipe: Any, prompt: str, seed: int = 0) -> dict[str, float]:
    """Per real token: its mean attention on the object's latent pixels divided by its mean
    attention on background pixels, in the 8x8 cross-attention layers (>1: local)."""
    maps, image = _record(pipe, prompt, seed)
    side = pipe.unet.config.sample_size
    full = torch.stack([m for m in maps if m.shape[0] == side * side]).mean(0)  # (64, T)
    # object = pixels far from the corner (background) colour, pooled to the latent grid
    diff = np.abs(image.astype(np.float32) - image[0, 0].astype(np.float32)).sum(-1) > 60
    f = image.shape[0] // side
    obj = torch.from_numpy(diff.reshape(side, f, side, f).mean(axis=(1, 3)).reshape(-1) > 0.5)
    if obj.all() or not obj.any():
        raise ValueError(f"no separable object in the image for {prompt!r}")
    special = set(pipe.tokenizer.all_special_tokens)
    return {
        tok: float(full[obj, i].mean() / full[~obj, i].mean())
        for i, tok in enumerate(_tokens(pipe, prompt)) if tok not in special
    }


def attention_summary(pipe: Any, prompt: str) -> dict[str, float]:
    tokens, share = token_attention(pipe, prompt)
    special = set(pipe.tokenizer.all_special_tokens)
    summary = {"start": float(share[0])}
    for i, tok in enumerate(tokens):
        if tok not in special:
            summary[tok] = float(share[i])
    summary["end + pads"] = float(sum(s for t, s in zip(tokens[1:], share[1:]) if t in special))
    return summary


def print_joint_attention(pipe: Any, detector: Detector, seed: int = 0) -> None:
    from . import dit_attention as da

    print("\njoint attention of image queries (all blocks, heads, pixels, steps; conditional row):")
    for prompt in ("a red circle", "a blue striped star"):
        share = da.joint_attention_share(pipe, prompt)
        print(f"  {prompt!r}: " + ", ".join(f"{k} {v:.3f}" for k, v in share.items()))
        local = da.joint_locality(pipe, prompt)
        print("    object/background attention ratio: " + ", ".join(f"{k} {v:.2f}" for k, v in local.items()))
        for b, row in enumerate(da.by_block(pipe, prompt)):
            print(f"    block {b}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
        leak = da.text_leak(pipe, prompt)
        print("    text-stream queries' attention to real tokens (blocks 0..L-2): "
              + ", ".join(f"{k} {v:.3f}" for k, v in leak.items()))
    rng = np.random.default_rng(seed + 7)
    things = [Thing(SHAPES[rng.integers(5)], COLOURS[rng.integers(5)], "plain") for _ in range(25)]
    prompts = [f"a {t.colour} {t.shape}" for t in things]
    route = da.route_test(pipe, detector, prompts, [{t.colour, t.shape} for t in things], seed)
    print(f"  route test, 25 prompts 'a {{colour}} {{shape}}': attributes detected {route['full']:.3f}; "
          f"with image queries' attention to real tokens cut {route['cut']:.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=pathlib.Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backbone", choices=("unet", "dit"), default="unet")
    ap.add_argument("--variant", choices=("default", "sink-pads"), default="default",
                    help="unet variant: the shipped model (default) or the sink-pads variant (weights/sink-pads/; "
                    "with --weights, DIR holds its unet, sink and model.json); judged by the shipped detector")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(weights_dir=args.weights, backbone=args.backbone, variant=args.variant)
    # a variant has no detector of its own: it shares the shipped autoencoder and detector
    own_detector = args.weights is not None and args.variant == "default"
    detector = load_detector(args.weights / "detector.safetensors" if own_detector else None)

    images, labels = render_labelled(np.random.default_rng(10_000 + args.seed), 1000)
    acc = attribute_accuracy(detector, images, labels)
    print("detector on 1000 fresh renders: mean per-attribute %.4f, exact set %.3f" % (acc["mean"], acc["exact"]))
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items() if k not in ("mean", "exact")))

    print(f"\nquality gate ({STEPS} steps of {type(pipe.scheduler).__name__}, guidance {GUIDANCE}):")
    print(f"{'row':24s} {'rate':>6s} {'n':>5s} {'gate':>6s}")
    for row, (rate, n) in quality_gate(pipe, detector, args.n, args.seed).items():
        gate = GATE.get(row)
        verdict = "" if gate is None else f"{gate:6.2f} {'met' if rate >= gate else 'MISSED'}"
        print(f"{row:24s} {rate:6.3f} {n:5d} {verdict}")

    if args.backbone == "dit":
        print_joint_attention(pipe, detector, args.seed)
        return

    print("\ncross-attention share (all layers, heads, pixels, steps; conditional rows):")
    sink_pads = getattr(pipe.text_encoder.config, "pad_mode", "zero") == "sink"
    if sink_pads:
        print("  (pad_mode 'sink': start, end and pad slots hold the same sink vector, so each receives the same "
              "share; 'sink' is their sum)")
    for prompt in ("a red circle", "a blue striped star"):
        summary = attention_summary(pipe, prompt)
        if sink_pads:
            summary["sink"] = summary["start"] + summary["end + pads"]
        print(f"  {prompt!r}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
        local = concept_locality(pipe, prompt)
        print("    object/background attention ratio (8x8 layers): "
              + ", ".join(f"{k} {v:.2f}" for k, v in local.items()))


if __name__ == "__main__":
    main()
