"""Joint-attention profile of the transformer shapes model (quality.py prints it).

For image queries in every MM-DiT block, the prompt's own (unguarded) joint attention is a
softmax over [64 image keys; 32 CLIP-slot keys; 256 T5-slot keys]. `joint_attention_share`
splits it by key class (image, sink/start, each real token, end, CLIP-slot pads, T5 slot),
averaged over blocks, heads, pixels and steps, conditional row only. `joint_locality` is
a real token's mean attention on the object's pixels over that on the background
(`by_block`: both per block).
`text_leak` is how much attention the text stream's no-content queries (sink, end, pads,
T5 slot) pay to real tokens (the route by which prompt content could spread into them),
and `route_test` generates with the image queries' attention to real tokens cut: what is
still drawn then reached the image by another route.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .dit_model import ExplicitJointAttnProcessor

GUIDANCE = 5.0
STEPS = 20


class RecordingJointProcessor(ExplicitJointAttnProcessor):
    """Stock joint attention (`JointAttnProcessor2_0`'s math, explicit softmax) that records
    the last batch row's attention, mean over heads, and optionally cuts image queries'
    attention to some text keys (`cut`: (T,) bool over text positions, last row only)."""

    def __init__(self, records: list[torch.Tensor], cut: torch.Tensor | None = None):
        self.records = records
        self.cut = cut

    def adjust(self, logits: torch.Tensor, n: int) -> torch.Tensor:
        if self.cut is not None:
            block = torch.zeros(logits.shape[-1], dtype=torch.bool)
            block[n:] = self.cut
            logits[-1, :, :n, block] = float("-inf")
        return logits

    def seen(self, attn: Any, probs: torch.Tensor, n: int) -> None:
        self.records.append(probs[-1].mean(0))  # (S, S): last row, mean over heads


def _run(pipe: Any, prompt: str, seed: int, cut: torch.Tensor | None = None) -> tuple[list[torch.Tensor], np.ndarray]:
    """Attention records (block-major per step) of the conditional row and the image."""
    records: list[torch.Tensor] = []
    saved = pipe.transformer.attn_processors
    pipe.transformer.set_attn_processor(RecordingJointProcessor(records, cut))
    try:
        with torch.no_grad():
            image = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    finally:
        pipe.transformer.set_attn_processor(saved)
    return records, np.round(image * 255).astype(np.uint8)


def _layout(pipe: Any, prompt: str) -> tuple[list[str], int]:
    """CLIP-slot tokens of `prompt` and the number of image tokens."""
    tok = pipe.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    cfg = pipe.transformer.config
    n_image = (cfg.sample_size // cfg.patch_size) ** 2
    return tok.convert_ids_to_tokens(ids), n_image


def _classes(pipe: Any, tokens: list[str]) -> tuple[dict[str, int], int, list[int], list[int]]:
    """Real token -> CLIP-slot index; end index; CLIP-slot pad indices; special indices."""
    special = set(pipe.tokenizer.all_special_tokens)
    real: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if i > 0 and t not in special:
            name, j = t, 2
            while name in real:  # a word that occurs twice
                name, j = f"{t}#{j}", j + 1
            real[name] = i
    end = tokens.index(pipe.tokenizer.sep_token)
    pads = [i for i in range(end + 1, len(tokens))]
    return real, end, pads, [i for i in range(len(tokens)) if i not in real.values()]


def joint_attention_share(pipe: Any, prompt: str, seed: int = 0) -> dict[str, float]:
    """Share of image queries' joint attention per key class (sums to 1)."""
    records, _ = _run(pipe, prompt, seed)
    tokens, n = _layout(pipe, prompt)
    clip = len(tokens)
    rows = torch.stack([r[:n] for r in records]).mean(0).mean(0)  # (S,): image queries' mean row
    real, end, pads, _ = _classes(pipe, tokens)
    share = {"image": float(rows[:n].sum()), "sink": float(rows[n])}
    for name, i in real.items():
        share[name] = float(rows[n + i])
    share["end"] = float(rows[n + end])
    share["clip pads"] = float(rows[[n + i for i in pads]].sum())
    share["t5 slot"] = float(rows[n + clip :].sum())
    return share


def object_mask(image: np.ndarray, side: int) -> torch.Tensor:
    """(side * side,) bool: latent pixels covered by the object (far from the corner colour)."""
    diff = np.abs(image.astype(np.float32) - image[0, 0].astype(np.float32)).sum(-1) > 60
    f = image.shape[0] // side
    return torch.from_numpy(diff.reshape(side, f, side, f).mean(axis=(1, 3)).reshape(-1) > 0.5)


def joint_locality(pipe: Any, prompt: str, seed: int = 0) -> dict[str, float]:
    """Per real token: mean attention on the object's pixels over that on background pixels,
    over all blocks and steps (every block sees the 8x8 grid; >1: local)."""
    records, image = _run(pipe, prompt, seed)
    tokens, n = _layout(pipe, prompt)
    full = torch.stack([r[:n] for r in records]).mean(0)  # (64, S)
    obj = object_mask(image, int(math.isqrt(n)))
    if obj.all() or not obj.any():
        raise ValueError(f"no separable object in the image for {prompt!r}")
    real, _, _, _ = _classes(pipe, tokens)
    return {name: float(full[obj, n + i].mean() / full[~obj, n + i].mean()) for name, i in real.items()}


def text_leak(pipe: Any, prompt: str, seed: int = 0) -> dict[str, float]:
    """Attention that text-stream queries pay to real tokens, by query class, over the
    blocks whose text output is used (all but the last), heads and steps."""
    records, _ = _run(pipe, prompt, seed)
    tokens, n = _layout(pipe, prompt)
    clip = len(tokens)
    blocks = len(pipe.transformer.transformer_blocks)
    used = [r for i, r in enumerate(records) if i % blocks != blocks - 1]
    text = torch.stack([r[n:, n:] for r in used]).mean(0)  # (T, T)
    real, end, pads, _ = _classes(pipe, tokens)
    cols = [n_i for n_i in real.values()]
    to_real = text[:, cols].sum(-1)
    return {
        "sink": float(to_real[0]),
        "end": float(to_real[end]),
        "clip pads": float(to_real[pads].mean()) if pads else float("nan"),
        "t5 slot": float(to_real[clip:].mean()),
        "real tokens": float(to_real[cols].mean()),
    }


def route_test(
    pipe: Any,
    detector: Callable[[np.ndarray], list[set[str]]],
    prompts: list[str],
    attributes: list[set[str]],
    seed: int = 0,
) -> dict[str, float]:
    """Detection rate of the prompted attributes with and without the image queries'
    attention to real tokens (conditional row). Cut: what the model still draws arrived
    through the sink, end, pads or T5 slot (their text stream read the prompt), which a
    growth inhibitor on the concept's tokens would not reach."""
    out: dict[str, float] = {}
    for mode in ("full", "cut"):
        hits: list[float] = []
        for j, (prompt, want) in enumerate(zip(prompts, attributes)):
            cut: torch.Tensor | None = None
            if mode == "cut":
                tokens, _ = _layout(pipe, prompt)
                real, _, _, _ = _classes(pipe, tokens)
                cut = torch.zeros(len(tokens) + 256, dtype=torch.bool)  # CLIP slot + default T5 slot
                cut[list(real.values())] = True
            _, image = _run(pipe, prompt, seed + j, cut)
            found = detector(image[None])[0]
            hits.append(float(np.mean([a in found for a in want])))
        out[mode] = float(np.mean(hits))
    return out


def by_block(pipe: Any, prompt: str, seed: int = 0) -> list[dict[str, float]]:
    """Per block (mean over heads, pixels, steps): image-key share, zero-token share (end,
    pads, T5 slot), each real token's share and its object/background ratio ("loc ...")."""
    records, image = _run(pipe, prompt, seed)
    tokens, n = _layout(pipe, prompt)
    real, end, _, _ = _classes(pipe, tokens)
    obj = object_mask(image, int(math.isqrt(n)))
    blocks = len(pipe.transformer.transformer_blocks)
    out: list[dict[str, float]] = []
    for b in range(blocks):
        rows = torch.stack([r[:n] for i, r in enumerate(records) if i % blocks == b]).mean(0)  # (64, S)
        mean = rows.mean(0)
        row = {"image": float(mean[:n].sum()), "zero tokens": float(mean[n + end :].sum())}
        for name, i in real.items():
            row[name] = float(mean[n + i])
            row[f"loc {name}"] = float(rows[obj, n + i].mean() / rows[~obj, n + i].mean())
        out.append(row)
    return out
