"""Train the shapes model from a seed: autoencoder, then UNet (+ sink vector), then detector.

    python -m gie_guard.shapes.train --seed 0 --out DIR [--minutes M]
    python -m gie_guard.shapes.train --backbone dit --seed 0 --out DIR

`--backbone dit` trains the transformer (SD3-family) model instead, on the packaged
autoencoder and detector (dit_train.py); the default `unet` is the run described here.

    python -m gie_guard.shapes.train --variant sink-pads --out DIR [--minutes M]

`--variant sink-pads` trains the sink-pads variant (docs/shapes.md): only the UNet and sink,
warm-started from the shipped ones (--warm-start), on a latent pool encoded with the
shipped autoencoder and its scaling factor, with end/pad positions holding copies of the
sink (--pad-mode sink) and half the scenes showing two things (--p-two 0.5). It writes
unet.safetensors, sink.safetensors and model.json; copy them into
gie_guard/shapes/weights/sink-pads/ to ship them. The detector is the shipped one.

Step counts are fixed (so a seed reproduces the model); --minutes is a safety cap that
stops the UNet stage early. Weights are written to DIR in float16 every few hundred UNet
steps, so an interrupted run still leaves a usable model. Copy DIR's files into
gie_guard/shapes/weights/ to ship them.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from typing import Any, Generic, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from . import detector as det
from .model import WEIGHTS_DIR, load_vae, new_unet, new_vae, train_scheduler
from .text_encoder import PAD_MODES, SinkEncoderBase, SinkTextEncoder, load_tokenizer
from .world import Scene, describe, render, sample_scene

P_TWO = 0.2  # share of two-thing scenes
P_NO_COLOUR = 0.1  # captions that leave the colour unsaid
P_EMPTY = 0.1  # empty captions, for classifier-free guidance


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> (N, 3, 32, 32) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def half_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().half().contiguous() for k, v in module.state_dict().items()}


class Log:
    def __init__(self, path: pathlib.Path):
        self.path = path
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def train_vae(rng: np.random.Generator, steps: int, batch: int, log: Log) -> Any:
    vae = new_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        x = to_tensor(np.stack([render(sample_scene(rng, P_TWO), rng) for _ in range(batch)]))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        # L1 keeps stripes and dots sharp; a tiny KL weight keeps the code bounded
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.5f}")
    vae.eval()
    return vae


@torch.no_grad()
def encode_pool(vae: Any, rng: np.random.Generator, n: int, p_two: float = P_TWO) -> tuple[list[Scene], torch.Tensor]:
    """n scenes (a share ``p_two`` of them with two things) and their unscaled latents (n, 4, 8, 8)."""
    scenes = [sample_scene(rng, p_two) for _ in range(n)]
    chunks: list[torch.Tensor] = []
    for i in range(0, n, 256):
        x = to_tensor(np.stack([render(s, rng) for s in scenes[i : i + 256]]))
        chunks.append(vae.encode(x).latent_dist.mean)
    return scenes, torch.cat(chunks)


def build_pool(
    vae: Any, rng: np.random.Generator, n: int, p_two: float = P_TWO, scale: float | None = None,
) -> tuple[list[Scene], torch.Tensor, float]:
    """n scenes (a share ``p_two`` of them with two things) with their scaled latents
    (n, 4, 8, 8), and the scaling factor: ``scale`` when given (a shipped autoencoder's),
    else one measured on the pool."""
    scenes, latents = encode_pool(vae, rng, n, p_two)
    if scale is None:
        scale = 1.0 / latents.std().item()
    return scenes, latents * scale, scale


_Encoder = TypeVar("_Encoder", bound=SinkEncoderBase)


class CaptionStates(Generic[_Encoder]):
    """Frozen MiniLM states per caption, cached in half precision for the captions marked
    cacheable: MiniLM costs more per caption than a training step does per image."""

    def __init__(self, encoder: _Encoder, tokenizer: PreTrainedTokenizerBase):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def fresh(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row of ``ids``: its states in this batch (from position 0) and what to cache."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, captions: list[str], cacheable: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) and MiniLM states (B, T, 384)."""
        ids = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        states = torch.zeros(len(captions), ids.shape[1], self.encoder.config.hidden_size)
        missing = [i for i, c in enumerate(captions) if c not in self.cache]
        if missing:
            for i, (row, keep) in zip(missing, self.fresh(ids[missing])):
                states[i, : row.shape[0]] = row
                if cacheable[i]:
                    self.cache[captions[i]] = keep.half()
        fresh_rows = set(missing)
        for i, c in enumerate(captions):
            if i not in fresh_rows:
                cached = self.cache[c]
                states[i, : cached.shape[0]] = cached.float()
        return ids, states


class TokenStates(CaptionStates[SinkTextEncoder]):
    """The UNet model's text: MiniLM's last states, zero past each caption's end (cached for
    the few single-thing captions)."""

    def fresh(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        length = int((ids != self.tokenizer.pad_token_id).sum(1).max())
        states = self.encoder.token_states(ids)[:, :length]  # zero past `length`
        return [(row, row) for row in states]


def compress_context(ids: torch.Tensor, context: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The context cut to the batch's longest caption plus one pad slot, and the UNet's
    ``encoder_attention_mask`` that gives that slot the logit bonus ln(k) of the k identical
    pad slots it stands for: the same attention output (measured difference about 1e-4)
    at two thirds of a training step's cost. Context past the longest caption is one
    vector repeated (zeros, or the sink with ``pad_mode`` "sink"), and k copies of a key
    receive what one copy with logit + ln(k) would, so outputs and gradients are unchanged.
    The UNet turns the mask m into the additive bias (1 - m) * -10000."""
    length = int((ids != pad_id).sum(1).max()) + 1
    if length >= ids.shape[1]:
        return context, None
    copies = ids.shape[1] - length + 1
    mask = torch.ones(ids.shape[0], length, dtype=context.dtype)
    mask[:, -1] = 1.0 + math.log(copies) / 10000.0
    return context[:, :length], mask


def optimizer_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.Tensor],
    averages: list[tuple[torch.Tensor, torch.Tensor]],
    step: int,
) -> None:
    """One training step from ``loss`` (gradients clipped to norm 1), then every
    ``(average, live)`` pair's exponential moving average moved towards the live tensor."""
    opt.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    decay = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        for average, live in averages:
            average.lerp_(live.detach(), 1 - decay)


def train_unet(
    scenes: list[Scene], latents: torch.Tensor, encoder: SinkTextEncoder, tokenizer: PreTrainedTokenizerBase,
    rng: np.random.Generator, steps: int, batch: int, deadline: float, out: pathlib.Path, log: Log,
    warm_start: pathlib.Path | None = None, compress: bool = False, two_order: str = "left-right",
) -> tuple[int, float | None]:
    """Train the UNet and the encoder's sink; with ``warm_start`` (a folder holding
    unet.safetensors and sink.safetensors) both start from those weights; with
    ``compress`` the repeated pad slots are folded into one (:func:`compress_context`);
    with ``two_order`` "random" a two-thing caption names its things in random order
    (as "a cat and a dog" in Stable Diffusion's captions says nothing of left and right),
    so which phrase belongs where can only come from the image: binding by attention."""
    torch.manual_seed(int(rng.integers(2**31)))
    unet = new_unet()
    ema = new_unet()
    # the sink starts at about 3x a token state's norm (about 30): an easy winner over the 75
    # zero end/pad slots wherever the UNet wants to attend to nothing in particular
    with torch.no_grad():
        encoder.sink.copy_(torch.randn(encoder.config.hidden_size) * 1.5)
    if warm_start is not None:
        unet.load_state_dict({k: v.float() for k, v in load_file(warm_start / "unet.safetensors").items()})
        with torch.no_grad():
            encoder.sink.copy_(load_file(warm_start / "sink.safetensors")["sink"].float())
        log(f"warm start from {warm_start}")
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    ema_sink = encoder.sink.detach().clone()
    params = list(unet.parameters()) + [encoder.sink]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    warmup = 100

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    noise_sched = train_scheduler()
    texts = TokenStates(encoder, tokenizer)
    averages = list(zip(ema.parameters(), unet.parameters())) + [(ema_sink, encoder.sink)]
    running: float | None = None

    def save(step: int) -> None:
        save_file(half_state(ema), out / "unet.safetensors")
        save_file({"sink": ema_sink.half()}, out / "sink.safetensors")
        log(f"saved EMA weights at step {step}")

    for step in range(steps):
        idx = rng.integers(len(scenes), size=batch)
        captions, cacheable = [], []
        for i in idx:
            empty = rng.random() < P_EMPTY
            scene = scenes[i]
            if two_order == "random" and len(scene.things) == 2 and rng.random() < 0.5:
                scene = Scene(scene.things[::-1])  # the caption only: the latent stays left to right
            captions.append("" if empty else describe(scene, rng, p_no_colour=P_NO_COLOUR))
            cacheable.append(len(scenes[i].things) == 1 or empty)
        ids, states = texts(captions, cacheable)
        context = encoder.assemble(ids, states)  # (B, 77, 384), sink at position 0
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        t = torch.from_numpy(rng.integers(0, noise_sched.config.num_train_timesteps, size=batch))
        xt = noise_sched.add_noise(x0, noise, t)
        if compress:
            context, mask = compress_context(ids, context, tokenizer.pad_token_id)
            loss = F.mse_loss(unet(xt, t, context, encoder_attention_mask=mask).sample, noise)
        else:
            loss = F.mse_loss(unet(xt, t, context).sample, noise)
        optimizer_step(loss, opt, sched, params, averages, step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"unet step {step} loss {loss.item():.4f} ema-loss {running:.4f} lr {sched.get_last_lr()[0]:.2e}")
        if (step + 1) % 250 == 0:
            save(step + 1)
        if time.time() > deadline:
            log(f"time cap reached at step {step + 1}")
            save(step + 1)
            return step + 1, running
    save(steps)
    return steps, running


SINK_PADS_P_TWO = 0.5  # --variant sink-pads: half the scenes show two things
SINK_PADS_PAD_MODE = "sink"


def train_sink_pads(args: argparse.Namespace) -> None:
    """The sink-pads variant: UNet + sink only, on the shipped autoencoder (docs/shapes.md)."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train.log")
    start = time.time()
    warm_start = WEIGHTS_DIR if args.warm_start is None else args.warm_start
    p_two = SINK_PADS_P_TWO if args.p_two is None else args.p_two
    pad_mode = SINK_PADS_PAD_MODE if args.pad_mode is None else args.pad_mode
    log(f"args {vars(args)}; warm start {warm_start}, p_two {p_two}, pad_mode {pad_mode}")

    # the shipped autoencoder and its scaling factor: the warm-start UNet was trained on those latents
    vae = load_vae(WEIGHTS_DIR).eval()
    shared_scale = float(vae.config.scaling_factor)
    scenes, latents, scale = build_pool(vae, rng, args.pool, p_two, scale=shared_scale)
    shipped = warm_start.resolve() == WEIGHTS_DIR.resolve()
    meta: dict[str, Any] = {
        "variant": "sink-pads",
        "pad_mode": pad_mode,
        "p_two": p_two,
        "two_order": args.two_order,
        "warm_start": "shipped weights/ (unet, sink)" if shipped else str(warm_start),
        "vae": "shared: weights/vae.safetensors",
        "scaling_factor": scale,
        "seed": args.seed,
        "batch": 64,
        "pool": args.pool,
    }
    if not shipped and (warm_start / "model.json").exists():  # a chain of runs: keep the earlier run's record
        meta["warm_start_run"] = json.loads((warm_start / "model.json").read_text())
    (args.out / "model.json").write_text(json.dumps(meta, indent=1))  # loadable while training runs
    log(f"latent pool {tuple(latents.shape)} from the shipped autoencoder, scaling factor {scale:.4f}")

    tokenizer = load_tokenizer()
    encoder = SinkTextEncoder.create(tokenizer, pad_mode=pad_mode)
    deadline = start + args.minutes * 60  # no detector stage
    done, loss = train_unet(scenes, latents, encoder, tokenizer, rng, args.unet_steps, 64, deadline, args.out, log,
                            warm_start=warm_start, compress=True, two_order=args.two_order)
    meta.update(unet_steps=done, unet_steps_planned=args.unet_steps, final_loss=loss,
                wall_minutes=(time.time() - start) / 60)
    (args.out / "model.json").write_text(json.dumps(meta, indent=1))
    log(f"done: {meta}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=("unet", "dit"), default="unet")
    ap.add_argument("--variant", choices=("default", "sink-pads"), default="default",
                    help="unet only. default: the full run (autoencoder, UNet + sink, detector); sink-pads: the "
                    "sink-pads variant, only UNet + sink on the shipped autoencoder, warm-started from the "
                    "shipped UNet and sink, with --pad-mode sink and --p-two 0.5 unless given")
    ap.add_argument("--warm-start", type=pathlib.Path, default=None,
                    help="folder with unet.safetensors and sink.safetensors to start the UNet stage from "
                    "(default: none; --variant sink-pads: the shipped gie_guard/shapes/weights/)")
    ap.add_argument("--p-two", type=float, default=None,
                    help=f"share of two-thing scenes in the UNet's latent pool (default {P_TWO}; --variant sink-pads 0.5)")
    ap.add_argument("--two-order", choices=("left-right", "random"), default="left-right",
                    help="order in which two-thing captions name their things: left to right (default, as the "
                    "world describes them) or random (caption order says nothing of position)")
    ap.add_argument("--pad-mode", choices=PAD_MODES, default=None,
                    help="what the text encoder's end and pad positions hold: zero vectors (default) or copies "
                    "of the sink (--variant sink-pads's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock cap for the whole run")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--unet-steps", type=int, default=1600)
    ap.add_argument("--detector-steps", type=int, default=600)
    ap.add_argument("--pool", type=int, default=20000, help="scenes the UNet (or transformer) trains on")
    # one thread: on a shared 2-core machine two threads spin-wait on each other (measured 10-40x slower)
    ap.add_argument("--threads", type=int, default=1)
    from . import dit_train

    dit_train.add_arguments(ap)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.variant == "sink-pads":
        if args.backbone != "unet":
            ap.error("--variant sink-pads is a UNet variant (--backbone unet)")
        train_sink_pads(args)
        return
    if args.backbone == "dit":
        args.out.mkdir(parents=True, exist_ok=True)
        log = Log(args.out / "train.log")
        log(f"args {vars(args)}")
        dit_train.train(args, log)
        return
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train.log")
    start = time.time()
    log(f"args {vars(args)}")

    vae = train_vae(rng, args.vae_steps, 64, log)
    save_file(half_state(vae), args.out / "vae.safetensors")
    p_two = P_TWO if args.p_two is None else args.p_two
    scenes, latents, scale = build_pool(vae, rng, args.pool, p_two)
    meta: dict[str, Any] = {"scaling_factor": scale, "seed": args.seed}
    if (args.pad_mode is not None or args.p_two is not None or args.warm_start is not None
            or args.two_order != "left-right"):
        meta.update(pad_mode=args.pad_mode or "zero", p_two=p_two, two_order=args.two_order,
                    warm_start=None if args.warm_start is None else str(args.warm_start))
    (args.out / "model.json").write_text(json.dumps(meta, indent=1))
    log(f"latent pool {tuple(latents.shape)}, scaling factor {scale:.4f}")

    tokenizer = load_tokenizer()
    encoder = SinkTextEncoder.create(tokenizer, pad_mode=args.pad_mode or "zero")
    # keep a tenth of the cap for the detector
    deadline = start + args.minutes * 60 * 0.9
    done, loss = train_unet(scenes, latents, encoder, tokenizer, rng, args.unet_steps, 64, deadline, args.out, log,
                            warm_start=args.warm_start, two_order=args.two_order)

    detector, accuracy = det.train_detector(rng, args.detector_steps, vae, log)
    save_file(half_state(detector), args.out / "detector.safetensors")
    meta.update(unet_steps=done, final_loss=loss, detector_accuracy=accuracy, wall_minutes=(time.time() - start) / 60)
    (args.out / "model.json").write_text(json.dumps(meta, indent=1))
    log(f"done: {meta}")


if __name__ == "__main__":
    main()
