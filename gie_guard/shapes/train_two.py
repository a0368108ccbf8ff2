"""Train the two-cell world's UNet (world_two.py): 64x32 canvases, 16x8 latents.

    python -m gie_guard.shapes.train_two --out DIR [--minutes M] [--steps N] [--ground W]

Only the UNet and the sink train, warm-started from the shipped one-thing model
(weights/: the same architecture; convolutions and attention do not care about the
canvas size), on a pool of canvases encoded with the shipped autoencoder and its scaling
factor (it is convolutional: a 64x32 canvas gives a 16x8 latent). End and pad slots are
zero, as in the shipped model: attention parked there adds nothing.

Grounding loss (``--ground``, its weight; 0 turns it off): every caption marks which
tokens name which cell's thing (world_two.Caption.spans); for each such token and each
cross-attention layer, the share of its attention mass (mean over heads) that falls
outside its cell is penalised, ``(1 - inside)^2``, as TokenCompose's token loss does with
segmentation masks (Wang et al., CVPR 2024). Why: in the one-thing models the UNet bound
words to things through MiniLM's contextual states and its convolutions, with near-uniform
maps (docs/shapes.md, the sink-pads variant: 2,900 steps on two-thing scenes with random
caption order left maps at ratio 0.9-1.1), so the world alone is not expected to make maps
local within this budget.

Context mixing (``--mix-layers N``, default 0: off): N trainable transformer encoder layers
with a learned position embedding on MiniLM's states (text_encoder.ContextMixer), identity
at the start, trained with the UNet and the sink; saved as ``mix.*`` tensors in
sink.safetensors and ``mix_layers`` in model.json, which load_pipeline reads.
``--warm-start`` may name any folder with unet.safetensors and sink.safetensors, e.g. the
shipped two-cell weights gie_guard/shapes/weights/two.

Weights are written to DIR in float16 (EMA) every ``--save-every`` steps and at the
``--minutes`` cap, with model.json, so a partial run is loadable:
``load_pipeline(world="two", weights_dir=DIR)``. Ship by copying DIR's unet.safetensors,
sink.safetensors and model.json into gie_guard/shapes/weights/two/.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from .model import WEIGHTS_DIR, load_vae, new_unet, train_scheduler
from .text_encoder import SinkTextEncoder, load_tokenizer
from .train import P_EMPTY, Log, TokenStates, compress_context, half_state, optimizer_step, to_tensor
from .world_two import (
    CELLS, P_SINGLE_PLACE, P_TWO, TWO_FORMS, Caption, TwoScene, caption_for, render_two, sample_two_scene,
)

LATENT_HW = (8, 16)  # 32x64 canvas / 4


@torch.no_grad()
def build_two_pool(
    vae: Any, rng: np.random.Generator, n: int, scale: float, p_two: float = P_TWO
) -> tuple[list[TwoScene], torch.Tensor]:
    """n two-cell scenes and their scaled latents (n, 4, 8, 16)."""
    scenes = [sample_two_scene(rng, p_two) for _ in range(n)]
    chunks: list[torch.Tensor] = []
    for i in range(0, n, 256):
        x = to_tensor(np.stack([render_two(s, rng) for s in scenes[i : i + 256]]))
        chunks.append(vae.encode(x).latent_dist.mean)
    return scenes, torch.cat(chunks) * scale


def token_cells(
    tokenizer: PreTrainedTokenizerBase, captions: list[Caption | None], places: bool = False
) -> torch.Tensor:
    """(B, T, 2) one-hot: which cell each token's thing is in (zero rows: tokens that name no
    thing, special tokens, empty captions). A token belongs to a thing when its first
    character lies in that thing's span; with `places`, the place words ("left", "right")
    are marked with their cell too."""
    length = tokenizer.model_max_length
    out = torch.zeros(len(captions), length, len(CELLS))
    for b, cap in enumerate(captions):
        if cap is None or not cap.spans:
            continue
        enc = tokenizer(cap.text, padding="max_length", max_length=length, truncation=True, return_offsets_mapping=True)
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            if e <= s:  # special token
                continue
            for cell, a, z in cap.spans + (cap.places if places else ()):
                if a <= s < z:
                    out[b, t, CELLS.index(cell)] = 1.0
    return out


def cell_masks(n: int, latent_hw: tuple[int, int] = LATENT_HW) -> torch.Tensor:
    """(n, 2) float: for a layer with n query pixels (the latent grid downsampled by a power
    of two, row-major), whether each pixel is in the left or the right half."""
    h0, w0 = latent_hw
    f = int(round(math.sqrt(h0 * w0 / n)))
    h, w = h0 // f, w0 // f
    if h * w != n:
        raise ValueError(f"{n} query pixels do not tile a {h0}x{w0} latent")
    col = torch.arange(w).repeat(h)  # (n,) column of each row-major pixel
    left = (col < w // 2).float()
    return torch.stack([left, 1 - left], dim=1)


class MapRecorder:
    """A cross-attention processor (diffusers' AttnProcessor arithmetic) that keeps each
    call's attention probabilities, mean over heads (B, N, T), with their graph, so a loss
    can act on the maps. One instance serves every attn2 layer; `maps` grows per forward."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        assert encoder_hidden_states is not None  # attn2 only
        b, n, _ = hidden_states.shape
        t = encoder_hidden_states.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, t, b)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, N, d)
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B*heads, T, d)
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, attention_mask)  # (B*heads, N, T)
        self.maps.append(probs.view(b, attn.heads, n, t).mean(dim=1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        projected: torch.Tensor = attn.to_out[1](attn.to_out[0](out))
        return projected



class Progress:
    """A two-cell training loop's bookkeeping after each optimiser step: moving averages of
    the denoising loss and of the grounding loss, a log line every 25 steps, EMA weights saved
    every ``save_every`` steps and at the end, and the wall-clock cap."""

    def __init__(self, name: str, log: Log, *, steps: int, save_every: int, deadline: float,
                 save: Any, learning_rate: Any) -> None:
        self.name, self.log, self.steps, self.save_every = name, log, steps, save_every
        self.deadline, self.save, self.learning_rate = deadline, save, learning_rate
        self.running: float | None = None  # moving average of the denoising loss
        self.ground: float | None = None  # and of the grounding loss, when there is one

    @staticmethod
    def _average(previous: float | None, value: float) -> float:
        return value if previous is None else 0.98 * previous + 0.02 * value

    def after(self, step: int, loss: float, ground: float | None = None) -> bool:
        """Record step ``step``; True when the run must stop (its time is up)."""
        if ground is not None:
            self.ground = self._average(self.ground, ground)
        self.running = self._average(self.running, loss)
        if step % 25 == 0 or step == self.steps - 1:
            extra = "" if self.ground is None else f" ground {self.ground:.4f}"
            self.log(f"{self.name} step {step} loss {loss:.4f} ema-loss {self.running:.4f}{extra} "
                     f"lr {self.learning_rate():.2e}")
        if (step + 1) % self.save_every == 0:
            self.save(step + 1)
        if time.time() > self.deadline:
            self.log(f"time cap reached at step {step + 1}")
            return True
        return False

    def finish(self, step: int) -> None:
        if (step + 1) % self.save_every != 0:  # not saved by the loop yet
            self.save(step + 1)

def with_grounding(
    total: torch.Tensor, maps: list[torch.Tensor], tokenizer: PreTrainedTokenizerBase, captions: list[Caption | None],
    args: argparse.Namespace,
) -> tuple[torch.Tensor, float | None]:
    """``total`` plus the grounding loss weighted by ``args.ground`` (off at 0), and the
    grounding loss's value for the progress log (None when off)."""
    if args.ground <= 0:
        return total, None
    g = grounding_loss(maps, token_cells(tokenizer, captions, places=bool(args.ground_places)))
    return total + args.ground * g, g.item()


def grounding_loss(maps: list[torch.Tensor], cells: torch.Tensor) -> torch.Tensor:
    """Mean over layers and grounded tokens of (1 - share of the token's attention mass
    inside its cell)^2. maps: per layer (B, N, T'); cells: (B, T, 2) from token_cells."""
    losses = []
    for m in maps:
        g = cells[:, : m.shape[2]]  # (B, T', 2): the context may be cut (compress_context)
        masks = cell_masks(m.shape[1])  # (N, 2)
        inside = torch.einsum("bnt,nc,btc->bt", m, masks, g)  # mass in the token's own cell
        total = m.sum(1).clamp_min(1e-8)  # (B, T')
        grounded = g.sum(-1)  # (B, T') 1 for grounded tokens
        share = inside / total
        losses.append(((1 - share) ** 2 * grounded).sum() / grounded.sum().clamp_min(1.0))
    return torch.stack(losses).mean()


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train.log")
    start = time.time()
    log(f"args {vars(args)}")
    warm = args.warm_start if args.warm_start is not None else WEIGHTS_DIR
    vae = load_vae(WEIGHTS_DIR).eval()  # the shared autoencoder and its scaling factor
    scale = float(vae.config.scaling_factor)
    scenes, latents = build_two_pool(vae, rng, args.pool, scale, args.p_two)
    log(f"latent pool {tuple(latents.shape)}, latent std {latents.std():.3f}")
    meta: dict[str, Any] = {
        "world": "two",
        "pad_mode": "zero",
        "sample_size": list(LATENT_HW),
        "scaling_factor": scale,
        "vae": "shared: weights/vae.safetensors",
        "warm_start": "shipped weights/ (unet, sink)" if args.warm_start is None else str(args.warm_start),
        "warm_start_run": (json.loads((warm / "model.json").read_text())
                           if args.warm_start is not None and (warm / "model.json").exists() else None),
        "ground": args.ground,
        "ground_places": bool(args.ground_places),
        "two_forms": TWO_FORMS,
        "single_place": P_SINGLE_PLACE,
        "p_two": args.p_two,
        "seed": args.seed,
        "batch": args.batch,
        "pool": args.pool,
        "lr": args.lr,
    }
    if args.mix_layers > 0:  # absent otherwise: model.json as before
        meta["mix_layers"] = args.mix_layers
    (args.out / "model.json").write_text(json.dumps(meta, indent=1))

    tokenizer = load_tokenizer()
    encoder = SinkTextEncoder.create(tokenizer, mix_layers=args.mix_layers)
    torch.manual_seed(int(rng.integers(2**31)))
    unet = new_unet(LATENT_HW)
    unet.load_state_dict({k: v.float() for k, v in load_file(warm / "unet.safetensors").items()})
    warm_sink = load_file(warm / "sink.safetensors")
    with torch.no_grad():
        encoder.sink.copy_(warm_sink["sink"].float())
    if any(k.startswith("mix.") for k in warm_sink):  # a warm start that has a mixer continues it
        encoder.load_mixer_state(warm_sink)
    ema_mixer = copy.deepcopy(encoder.mixer)
    if ema_mixer is not None:
        ema_mixer.requires_grad_(False)
    ema = new_unet(LATENT_HW)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    ema_sink = encoder.sink.detach().clone()
    recorder = MapRecorder()
    if args.ground > 0:
        unet.set_attn_processor({
            name: recorder if name.endswith("attn2.processor") else proc
            for name, proc in unet.attn_processors.items()
        })
    mixer_params = [] if encoder.mixer is None else list(encoder.mixer.parameters())
    params = list(unet.parameters()) + [encoder.sink] + mixer_params
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    warmup: int = min(50, int(args.steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return float(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    noise_sched = train_scheduler()
    texts = TokenStates(encoder, tokenizer)
    averages = list(zip(ema.parameters(), unet.parameters())) + [(ema_sink, encoder.sink)]
    if ema_mixer is not None and encoder.mixer is not None:
        averages += list(zip(ema_mixer.parameters(), encoder.mixer.parameters()))
    def save(step: int) -> None:
        save_file(half_state(ema), args.out / "unet.safetensors")
        mix = {k: v.half().contiguous() for k, v in encoder.mixer_state(ema_mixer).items()}
        save_file({"sink": ema_sink.half(), **mix}, args.out / "sink.safetensors")
        meta.update(steps=step, steps_planned=args.steps, final_loss=progress.running,
                    final_ground_loss=progress.ground, wall_minutes=(time.time() - start) / 60)
        (args.out / "model.json").write_text(json.dumps(meta, indent=1))
        log(f"saved EMA weights at step {step}")

    progress = Progress("unet", log, steps=args.steps, save_every=args.save_every, deadline=start + args.minutes * 60,
                        save=save, learning_rate=lambda: sched.get_last_lr()[0])
    step = 0
    for step in range(args.steps):
        idx = rng.integers(len(scenes), size=args.batch)
        caps: list[Caption | None] = [None if rng.random() < P_EMPTY else caption_for(scenes[i], rng) for i in idx]
        texts_ = ["" if c is None else c.text for c in caps]
        # one-thing captions repeat (a few thousand distinct): cache their MiniLM states
        cacheable = [c is None or len(c.spans) == 1 for c in caps]
        ids, states = texts(texts_, cacheable)
        context = encoder.assemble(ids, encoder.mix(ids, states))  # (B, 77, 384), sink at position 0, zeros past the end
        context, mask = compress_context(ids, context, tokenizer.pad_token_id)
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        t = torch.from_numpy(rng.integers(0, noise_sched.config.num_train_timesteps, size=args.batch))
        xt = noise_sched.add_noise(x0, noise, t)
        recorder.maps.clear()
        loss = F.mse_loss(unet(xt, t, context, encoder_attention_mask=mask).sample, noise)
        total, ground = with_grounding(loss, recorder.maps, tokenizer, caps, args)
        optimizer_step(total, opt, sched, params, averages, step)
        if progress.after(step, loss.item(), ground):
            break
    progress.finish(step)
    log(f"done: {meta}")
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=50.0, help="wall-clock cap for the whole run")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--pool", type=int, default=16000, help="scenes (canvases) the UNet trains on")
    ap.add_argument("--p-two", type=float, default=P_TWO, help="share of scenes with a thing in each cell")
    ap.add_argument("--ground", type=float, default=1.0, help="weight of the grounding loss (0: off)")
    ap.add_argument("--ground-places", type=int, choices=(0, 1), default=1,
                    help="1: the grounding loss also grounds the place words (left, right) to their cell")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--warm-start", type=pathlib.Path, default=None,
                    help="folder with unet.safetensors and sink.safetensors (default: the shipped weights/)")
    ap.add_argument("--mix-layers", type=int, default=0,
                    help="trainable context-mixing layers on MiniLM's states (0: none, the shipped model)")
    # one thread: on a shared 2-core machine two threads spin-wait on each other
    ap.add_argument("--threads", type=int, default=1)
    train(ap.parse_args(argv))


if __name__ == "__main__":
    main()
