"""Training of the transformer (SD3-family) shapes model; `python -m gie_guard.shapes.train
--backbone dit --seed 0 --out DIR` runs `main` here.

Reuses the shapes autoencoder (its latents and scaling factor) and judges with the same
detector: both are copied from the source weights into DIR, so DIR is a complete weights
folder (`load_pipeline(backbone="dit", weights_dir=DIR)`; ship by copying DIR's dit_*
files into gie_guard/shapes/weights/).

Objective: rectified flow as SD3 trains it (x_t = (1 - s) x_0 + s e, the transformer
predicts e - x_0, s drawn logit-normal, timestep 1000 s), on the same renders and
captions as the UNet model (20 % two-thing scenes, 10 % captions without colour, 10 %
empty; held-out words never seen), except that a two-thing scene of the pool keeps two
fixed captions (so MiniLM runs once per caption: it costs more than a training step). Text is folded to its content plus one log-count-biased
zero token (dit_model.reduced_length), the same function as the full 288-token text.

Text isolation (`--isolation`, weight of an auxiliary loss): the text stream's no-content
tokens (the sink and the end/pad/T5 zero tokens) also run queries in joint attention; what
they read from real tokens would spread the prompt into 280-odd tokens that carry no
concept of their own, out of growth inhibitors' reach. The auxiliary loss is the attention
those queries pay to real tokens (blocks whose text output is used); the measured value is
logged and reported by the quality gate.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import shutil
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from . import dit_model as dm
from .dit_text import SinkClipTextEncoder, create_encoders, load_dit_tokenizer
from .model import WEIGHTS_DIR
from .train import P_EMPTY, P_NO_COLOUR, CaptionStates, Log, build_pool, optimizer_step
from .world import Scene, describe


class ClipSlotStates(CaptionStates[SinkClipTextEncoder]):
    """MiniLM's hidden_states[-2] per caption (what SD3 reads), cached (2,384 distinct
    single-thing captions, two fixed captions per two-thing scene of the pool)."""

    def fresh(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        states = self.encoder.minilm_states(ids)[-2]
        lengths = (ids != self.tokenizer.pad_token_id).sum(1)
        return [(row, row[: int(length)]) for row, length in zip(states, lengths)]  # cached: zero after the prompt


def lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class Optimisation:
    """What a DiT training run updates: the transformer and both text sinks, their EMA copies
    (what is saved), and AdamW with warm-up and cosine decay (``lr_factor``)."""

    def __init__(self, transformer: Any, sinks: list[torch.Tensor], args: argparse.Namespace) -> None:
        self.ema = copy.deepcopy(transformer).requires_grad_(False)
        self.ema_sinks = [s.detach().clone() for s in sinks]
        self.params = list(transformer.parameters()) + sinks
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=1e-2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, args.steps, args.warmup))
        self.averages = list(zip(self.ema.parameters(), transformer.parameters())) + list(zip(self.ema_sinks, sinks))

    def step(self, total: torch.Tensor, step: int) -> None:
        optimizer_step(total, self.opt, self.sched, self.params, self.averages, step)

    def learning_rate(self) -> float:
        return float(self.sched.get_last_lr()[0])

    def save_weights(self, out: pathlib.Path) -> None:
        """The EMA transformer and sinks, float16, under their shipped file names."""
        save_file({k: v.half().contiguous() for k, v in dm.parameter_state(self.ema).items()}, out / dm.FILES["transformer"])
        save_file({"sink_1": self.ema_sinks[0].half(), "sink_2": self.ema_sinks[1].half()}, out / dm.FILES["text"])


def train(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    start = time.time()
    source = pathlib.Path(args.source) if args.source else WEIGHTS_DIR
    unet_meta = json.loads((source / "model.json").read_text())
    scaling = unet_meta["scaling_factor"]
    for name in ("vae.safetensors", "detector.safetensors"):
        shutil.copyfile(source / name, args.out / name)
    vae = dm.load_vae(source, scaling)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    scenes, latents, _ = build_pool(vae, rng, args.pool, scale=scaling)  # the shipped autoencoder's factor
    log(f"latent pool {tuple(latents.shape)} (autoencoder from {source}), latent std {latents.std():.3f}")
    # two-thing scenes keep two fixed captions each, so their MiniLM states can be cached
    two_thing = {i: [describe(s, rng) for _ in range(2)] for i, s in enumerate(scenes) if len(s.things) == 2}

    tokenizer = load_dit_tokenizer()
    enc1, enc2 = create_encoders(tokenizer)
    torch.manual_seed(int(rng.integers(2**31)))
    transformer = dm.new_transformer(zero_init=True)
    # sinks start at about 3x a token state's norm (layer 5: about 11)
    with torch.no_grad():
        enc1.sink.copy_(torch.randn(enc1.config.hidden_size) * 1.5)
        enc2.sink.copy_(torch.randn(enc2.config.hidden_size) * 1.5)
    optimisation = Optimisation(transformer, [enc1.sink, enc2.sink], args)
    texts = ClipSlotStates(enc1, tokenizer)
    pooled = dm.pooled_zeros(transformer, args.batch)
    meta: dict[str, Any] = {
        "backbone": "dit",
        "seed": args.seed,
        "scaling_factor": scaling,
        "clip_max_length": tokenizer.model_max_length,
        "transformer": dm.DIT_CONFIG,
        "scheduler": dm.FLOW_CONFIG,
        "isolation": args.isolation,
    }
    running: float | None = None
    leak_running: float | None = None

    def save(step: int) -> None:
        optimisation.save_weights(args.out)
        meta.update(steps=step, final_loss=running, text_leak=leak_running, wall_minutes=(time.time() - start) / 60)
        (args.out / dm.FILES["meta"]).write_text(json.dumps(meta, indent=1))
        log(f"saved EMA weights at step {step}")

    deadline = start + args.minutes * 60
    step = 0
    with dm.reduced_length(transformer, isolate=args.isolation > 0) as context:
        for step in range(args.steps):
            idx = rng.integers(len(scenes), size=args.batch)
            captions, cacheable = [], []
            for i in idx:
                if rng.random() < P_EMPTY:
                    captions.append("")
                elif i in two_thing:
                    captions.append(two_thing[i][rng.integers(2)])
                else:
                    captions.append(describe(scenes[i], rng, p_no_colour=P_NO_COLOUR))
                cacheable.append(True)
            ids, states = texts(captions, cacheable)
            _, features, real, begin = dm.clip_slot((enc1, enc2), tokenizer, captions, states)
            text = dm.reduce_text(features, real, begin)
            x0 = latents[idx]
            noise = torch.randn_like(x0)
            s = torch.sigmoid(torch.randn(args.batch))  # logit-normal(0, 1), as SD3
            xt = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * noise
            pred = dm.reduced_forward(transformer, context, xt, s * 1000, text, pooled)
            loss = F.mse_loss(pred, noise - x0)
            total = loss
            if context.leaks:
                leak = torch.stack(context.leaks).mean()
                total = loss + args.isolation * leak
                leak_running = leak.item() if leak_running is None else 0.98 * leak_running + 0.02 * leak.item()
            optimisation.step(total, step)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % 50 == 0 or step == args.steps - 1:
                leak_msg = "" if leak_running is None else f" text-leak {leak_running:.4f}"
                log(f"dit step {step} loss {loss.item():.4f} ema-loss {running:.4f}{leak_msg} lr {optimisation.learning_rate():.2e}")
            if (step + 1) % args.save_every == 0:
                save(step + 1)
            if time.time() > deadline:
                log(f"time cap reached at step {step + 1}")
                break
    save(step + 1)
    log(f"done: {meta}")
    return meta


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=2400, help="dit: transformer steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--isolation", type=float, default=1.0, help="dit: weight of the text-isolation loss (0: off)")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--source", type=pathlib.Path, default=None,
                    help="dit: folder with the autoencoder, its model.json and the detector (default: packaged)")
