"""Train the two-cell world's transformer (SD3-family) model: 64x32 canvases, 8x16 latents,
128 image tokens.

    python -m gie_guard.shapes.dit_train_two --out DIR [--minutes M] [--steps N] [--ground W]

The same recipe as the two-cell UNet (train_two.py) on the transformer of dit_train.py:
warm-started from the shipped one-thing transformer and sinks (weights/dit_*), on a pool of
canvases encoded with the shared autoencoder; rectified flow, reduced-length text and the
text-isolation loss as dit_train.py trains them; plus the grounding loss (``--ground``):
for each token naming a thing, the share of the image queries' attention to it (joint
attention, mean over heads, every block) that falls outside its cell is penalised.

The position table grows to 16x16 (``pos_embed_max_size``; a 8x16 latent needs 16 columns)
and is rebuilt so that the left cell keeps the shipped model's positions
(:func:`set_two_cell_positions`; the loader does the same). SD3's pipeline takes one
``sample_size``, so generate with ``height=32, width=64``.

DIR receives dit_transformer.safetensors, dit_text.safetensors (float16, EMA) and
dit_model.json every ``--save-every`` steps; ``load_pipeline(world="two", backbone="dit",
weights_dir=DIR)`` loads it. Ship by copying those three files into
gie_guard/shapes/weights/two/.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from . import dit_model as dm
from .dit_text import create_encoders, load_dit_tokenizer
from .dit_train import ClipSlotStates, Optimisation
from .model import WEIGHTS_DIR
from .train import P_EMPTY, Log
from .train_two import Progress, build_two_pool, with_grounding
from .world_two import P_TWO, Caption, caption_for

LATENT_HW = (8, 16)
# the one-thing transformer with a position table wide enough for 16 latent columns
DIT_TWO_CONFIG = dict(dm.DIT_CONFIG, sample_size=16, pos_embed_max_size=16)


def set_two_cell_positions(transformer: Any) -> None:
    """Replace the transformer's 16x16 sin-cos position table with one whose crop for an
    8x16 latent (rows 4-11, all 16 columns, as SD3's PatchEmbed crops it) holds row
    positions 0-7 and column positions 0-15: the left cell gets exactly the shipped 8x8
    model's positions, the right cell continues them. Without it the warm start's loss
    rose from 0.69 to 2.9 (diffusers' own 16x16 table puts other positions there)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    embed = transformer.pos_embed
    size = embed.pos_embed_max_size
    rows = torch.arange(size, dtype=torch.float32) - (size - LATENT_HW[0]) // 2
    cols = torch.arange(size, dtype=torch.float32) - (size - LATENT_HW[1]) // 2
    grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=0)  # (2, size, size): w first, as diffusers
    table = get_2d_sincos_pos_embed_from_grid(embed.proj.out_channels, grid.reshape(2, 1, size, size), output_type="pt")
    embed.pos_embed.copy_(table.float().unsqueeze(0))  # (1, size * size, dim)


class GroundingJointProcessor(dm.LogitBiasJointAttnProcessor):
    """The training processor (log-count bias, text isolation) that also keeps the image
    queries' attention to the text keys, mean over heads (B, N, T), with its graph."""

    def __init__(self, context: dm.ReducedContext, maps: list[torch.Tensor], isolate: bool = False):
        super().__init__(context, isolate)
        self.maps = maps

    def seen(self, attn: Any, probs: torch.Tensor, n: int) -> None:
        super().seen(attn, probs, n)
        self.maps.append(probs[:, :, :n, n:].mean(1))  # (B, N image queries, T text keys)


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train.log")
    log(f"args {vars(args)}")
    warm = args.warm_start if args.warm_start is not None else WEIGHTS_DIR
    scaling = json.loads((WEIGHTS_DIR / "model.json").read_text())["scaling_factor"]
    vae = dm.load_vae(WEIGHTS_DIR, scaling)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    scenes, latents = build_two_pool(vae, rng, args.pool, scaling, args.p_two)
    log(f"latent pool {tuple(latents.shape)}, latent std {latents.std():.3f}")

    tokenizer = load_dit_tokenizer()
    enc1, enc2 = create_encoders(tokenizer)
    transformer = dm.new_transformer(DIT_TWO_CONFIG)
    state = {k: v.float() for k, v in load_file(warm / dm.FILES["transformer"]).items()}
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"pos_embed.pos_embed"}:
        raise ValueError(f"warm-start weights do not fit: missing {missing}, unexpected {unexpected}")
    sinks_state = load_file(warm / dm.FILES["text"])
    with torch.no_grad():
        enc1.sink.copy_(sinks_state["sink_1"].float())
        enc2.sink.copy_(sinks_state["sink_2"].float())
    set_two_cell_positions(transformer)
    optimisation = Optimisation(transformer, [enc1.sink, enc2.sink], args)
    texts = ClipSlotStates(enc1, tokenizer)
    pooled = dm.pooled_zeros(transformer, args.batch)
    meta: dict[str, Any] = {
        "backbone": "dit",
        "world": "two",
        "latent_hw": list(LATENT_HW),
        "seed": args.seed,
        "scaling_factor": scaling,
        "clip_max_length": tokenizer.model_max_length,
        "transformer": DIT_TWO_CONFIG,
        "scheduler": dm.FLOW_CONFIG,
        "isolation": args.isolation,
        "ground": args.ground,
        "ground_places": bool(args.ground_places),
        "p_two": args.p_two,
        "pool": args.pool,
        "batch": args.batch,
        "lr": args.lr,
        "warm_start": "shipped weights/ (dit_transformer, dit_text)" if args.warm_start is None else str(warm),
        "vae": "shared: weights/vae.safetensors",
    }
    def save(step: int) -> None:
        optimisation.save_weights(args.out)
        meta.update(steps=step, steps_planned=args.steps, final_loss=progress.running,
                    final_ground_loss=progress.ground, wall_minutes=(time.time() - start) / 60)
        (args.out / dm.FILES["meta"]).write_text(json.dumps(meta, indent=1))
        log(f"saved EMA weights at step {step}")

    context = dm.ReducedContext()
    maps: list[torch.Tensor] = []
    transformer.set_attn_processor(GroundingJointProcessor(context, maps, isolate=args.isolation > 0))
    progress = Progress("dit", log, steps=args.steps, save_every=args.save_every, deadline=start + args.minutes * 60,
                        save=save, learning_rate=optimisation.learning_rate)
    step = 0
    for step in range(args.steps):
        idx = rng.integers(len(scenes), size=args.batch)
        caps: list[Caption | None] = [None if rng.random() < P_EMPTY else caption_for(scenes[i], rng) for i in idx]
        # one-thing captions repeat (a few thousand distinct): cache their MiniLM states
        ids, states = texts(["" if c is None else c.text for c in caps], [c is None or len(c.spans) == 1 for c in caps])
        _, features, real, begin = dm.clip_slot((enc1, enc2), tokenizer, ["" if c is None else c.text for c in caps], states)
        text = dm.reduce_text(features, real, begin)  # (B, K + 1, 768): content, one folded zero token
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        s = torch.sigmoid(torch.randn(args.batch))  # logit-normal(0, 1), as SD3
        xt = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * noise
        maps.clear()
        pred = dm.reduced_forward(transformer, context, xt, s * 1000, text, pooled)
        loss = F.mse_loss(pred, noise - x0)
        total = loss
        if context.leaks:
            total = total + args.isolation * torch.stack(context.leaks).mean()
        total, ground = with_grounding(total, maps, tokenizer, caps, args)
        optimisation.step(total, step)
        if progress.after(step, loss.item(), ground):
            break
    progress.finish(step)
    log(f"done: {meta}")
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock cap for the whole run")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--pool", type=int, default=12000, help="scenes (canvases) the transformer trains on")
    ap.add_argument("--p-two", type=float, default=P_TWO, help="share of scenes with a thing in each cell")
    ap.add_argument("--ground", type=float, default=1.0, help="weight of the grounding loss (0: off)")
    ap.add_argument("--ground-places", type=int, choices=(0, 1), default=1,
                    help="1: the grounding loss also grounds the place words (left, right) to their cell")
    ap.add_argument("--isolation", type=float, default=1.0, help="weight of the text-isolation loss (0: off)")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--warm-start", type=pathlib.Path, default=None,
                    help="folder with dit_transformer.safetensors and dit_text.safetensors (default: weights/)")
    ap.add_argument("--threads", type=int, default=1)
    train(ap.parse_args(argv))


if __name__ == "__main__":
    main()
