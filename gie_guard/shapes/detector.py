"""Attribute detector for the shapes world: the judge of shapes-world benchmarks.

A small CNN, multi-label over the 13 attribute words. It is trained on renders that are
blurred, noised, shifted and, for half of each batch, passed through the shapes
autoencoder with noise on the latents, so it tolerates the artefacts of generated images.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from .world import ATTRIBUTES, SIZE, label_vector, render, sample_scene
from .world_two import CELLS, split_cells

WEIGHTS = pathlib.Path(__file__).parent / "weights" / "detector.safetensors"
P_TWO = 0.3


class ShapesNet(nn.Module):
    """(N, 3, 32, 32) in [-1, 1] -> (N, 13) logits."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2),
            )

        # 32 -> 16 -> 8 -> 4 pixels
        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 96))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(96 * 16, len(ATTRIBUTES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


def _as_batch(images: Sequence[Image.Image] | np.ndarray) -> torch.Tensor:
    """PIL images or a (N, 32, 32, 3) uint8 array -> (N, 3, 32, 32) float in [-1, 1]."""
    if isinstance(images, np.ndarray):
        arr = images
    else:
        arr = np.stack([
            np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)) for im in images
        ])
    if arr.ndim != 4 or arr.shape[1:] != (SIZE, SIZE, 3) or arr.dtype != np.uint8:
        raise ValueError(f"expected (N, {SIZE}, {SIZE}, 3) uint8 images, got {arr.shape} {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Detector:
    """Call on images; returns, per image, the set of canonical attribute words present."""

    def __init__(self, net: ShapesNet, threshold: float = 0.5):
        self.net = net.eval()
        self.threshold = threshold

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
        """(N, 13) probabilities in ATTRIBUTES order."""
        return torch.sigmoid(self.net(_as_batch(images))).numpy()

    def __call__(self, images: Sequence[Image.Image] | np.ndarray) -> list[set[str]]:
        probs = self.probabilities(images)
        return [{a for a, p in zip(ATTRIBUTES, row) if p > self.threshold} for row in probs]


EMPTY_DIFF = 60  # summed |RGB| difference from the background that counts as drawn
EMPTY_SHARE = 0.05  # a cell with less than this share of drawn pixels is empty (a thing covers 15-45 %)


def empty_cells(images: np.ndarray) -> dict[str, np.ndarray]:
    """(N, 32, 64, 3) canvases -> per cell, (N,) bool: nothing drawn there. The detector was
    never trained on empty images (it reports a fixed set of attributes on one), so
    emptiness is judged on pixels: the background is the canvas's median colour."""
    background = np.median(images.reshape(len(images), -1, 3), axis=1)  # (N, 3)
    drawn = np.abs(images.astype(np.float32) - background[:, None, None, :]).sum(-1) > EMPTY_DIFF  # (N, 32, 64)
    return {cell: part[..., 0].mean(axis=(1, 2)) < EMPTY_SHARE for cell, part in split_cells(drawn[..., None]).items()}


def detect_cells(detector: Detector, images: np.ndarray) -> list[dict[str, set[str]]]:
    """Judge each cell of (N, 32, 64, 3) two-cell canvases (world_two.py) with the one-thing
    detector: per image {"left": attributes, "right": attributes}; an empty cell gives an
    empty set."""
    empty = empty_cells(images)
    found = {cell: detector(part) for cell, part in split_cells(images).items()}
    return [
        {cell: set() if empty[cell][i] else found[cell][i] for cell in CELLS}
        for i in range(len(images))
    ]


def load_detector(weights: str | pathlib.Path | None = None) -> Detector:
    net = ShapesNet()
    state = load_file(str(weights if weights is not None else WEIGHTS))
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return Detector(net)


def render_labelled(rng: np.random.Generator, n: int, p_two: float = P_TWO) -> tuple[np.ndarray, np.ndarray]:
    """n renders (n, 32, 32, 3) uint8 and their labels (n, 13)."""
    scenes = [sample_scene(rng, p_two) for _ in range(n)]
    return np.stack([render(s, rng) for s in scenes]), np.stack([label_vector(s) for s in scenes])


def _augment(x: torch.Tensor, vae: Any, gen: torch.Generator) -> torch.Tensor:
    """Generated-image look-alikes: autoencoder round trip, blur, shift, tint, noise."""
    n = x.shape[0]
    if vae is not None:
        half = n // 2
        with torch.no_grad():
            z = vae.encode(x[:half]).latent_dist.mean
            # latent noise up to 0.4 of the latents' spread, per image
            z = z + torch.randn(z.shape, generator=gen) * z.std() * 0.4 * torch.rand(half, 1, 1, 1, generator=gen)
            x = torch.cat([vae.decode(z).sample.clamp(-1, 1), x[half:]])
    blur = torch.rand(n, generator=gen) < 0.3
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))  # small shifts of a centred object never wrap it
    x = x * (1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)) + 0.1 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    x = x + torch.randn(x.shape, generator=gen) * 0.06 * torch.rand(n, 1, 1, 1, generator=gen)
    return x.clamp(-1, 1)


@torch.no_grad()
def attribute_accuracy(detector: Detector, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-attribute accuracy, their mean, and the share of images whose set is exactly right."""
    pred = detector.probabilities(images) > detector.threshold
    truth = labels > 0.5
    acc = {a: float((pred[:, i] == truth[:, i]).mean()) for i, a in enumerate(ATTRIBUTES)}
    acc["mean"] = float(np.mean([acc[a] for a in ATTRIBUTES]))
    acc["exact"] = float((pred == truth).all(1).mean())
    return acc


def train_detector(
    rng: np.random.Generator, steps: int, vae: Any, log: Callable[[str], None]
) -> tuple[ShapesNet, dict[str, float]]:
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    torch.manual_seed(int(rng.integers(2**31)))
    net = ShapesNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        images, labels = render_labelled(rng, 64)
        x = _augment(_as_batch(images), vae, gen)
        loss = F.binary_cross_entropy_with_logits(net(x), torch.from_numpy(labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"detector step {step} loss {loss.item():.4f}")
    net.eval()
    images, labels = render_labelled(rng, 2000)
    acc = attribute_accuracy(Detector(net), images, labels)
    log(f"detector accuracy on 2000 fresh renders: {acc}")
    return net, acc
