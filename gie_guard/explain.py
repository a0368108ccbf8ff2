"""Pictures of what the guard does: a concept's attention maps over the denoising steps,
unguarded and guarded, beside the two images (in the manner of the GIE paper's Figure 1).

    from gie_guard.explain import explain
    result = explain(pipe, guard, "a red circle", concept="circle", seed=0, steps=20)
    result.figure.save("explain.png")

or ``gie-guard explain --prompt "a red circle" --policy shapes-demo --out explain.png``.

The maps are recorded by forward pre-hooks on the UNet's cross-attention modules, beside
whatever processors run (the guard's included), so the engine's hot path is untouched.
At every step and cross-attention layer the hook computes, for the conditional rows,
``M_c = softmax(Q K_c^T / sqrt(d))`` with the concept's own encoding ``K_c = to_k(E_c)`` (as
the engine does), sums it over the concept's own token slots and averages over heads, the
conditional batch and the layers of one resolution (the highest by default). A value is the
share of the concept's attention that falls on its tokens at that pixel: where the concept
"grows" in the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import ConceptError

__all__ = ["Explanation", "concept_recorder", "explain", "record_concept_maps", "render_figure"]


@dataclass(frozen=True)
class Explanation:
    """``maps_*``: (steps, h, w) arrays; ``images``: the unguarded and guarded images."""

    concept_id: str
    scale: float
    prompt: str
    seed: int
    image_before: Image.Image
    image_after: Image.Image
    maps_before: np.ndarray
    maps_after: np.ndarray
    figure: Image.Image


class _Recorder:
    """Hooks on one call: per step, per layer resolution, the summed concept map (N,) list."""

    def __init__(self, pipe: Any, keys: dict[str, torch.Tensor], positions: Sequence[int]) -> None:
        self.pipe = pipe
        self.keys = keys  # module name -> concept encoding E_c (T, D), on the UNet's device
        self.positions = list(positions)
        self.step = -1
        self.latent_hw: tuple[int, int] = (0, 0)
        self.maps: dict[int, dict[str, torch.Tensor]] = {}  # step -> module name -> map (N,)
        self._handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        unet = self.pipe.unet
        self._handles.append(unet.register_forward_pre_hook(self._on_unet, with_kwargs=True))
        for name in self.keys:
            module = unet.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _on_unet(self, _module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.step += 1
        self.latent_hw = tuple(sample.shape[-2:])  # type: ignore[assignment]

    def _hook(self, name: str):
        def hook(attn: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if kwargs.get("encoder_hidden_states") is None and len(args) < 2:
                return
            with torch.no_grad():
                self._record(attn, name, hidden)

        return hook

    def _record(self, attn: Any, name: str, hidden: torch.Tensor) -> None:
        if hidden.ndim == 4:  # (B, C, H, W) -> (B, N, C)
            hidden = hidden.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
        batch = hidden.shape[0]
        if getattr(self.pipe, "do_classifier_free_guidance", False) and batch % 2 == 0:
            hidden = hidden[batch // 2 :]  # [unconditional; conditional]: the prompt's half
        heads = attn.heads
        head_dim = attn.to_k.out_features // heads
        query = attn.to_q(hidden).view(hidden.shape[0], -1, heads, head_dim).transpose(1, 2)  # (Bc, h, N, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        embeds = self.keys[name][None]
        if attn.norm_cross:
            embeds = attn.norm_encoder_hidden_states(embeds)
        key = attn.to_k(embeds).view(1, -1, heads, head_dim).transpose(1, 2)  # (1, h, T, d)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        maps = torch.softmax((query @ key.transpose(-1, -2)).float() * attn.scale, dim=-1)  # (Bc, h, N, T)
        share = maps[..., self.positions].sum(-1).mean(dim=(0, 1))  # (N,)
        self.maps.setdefault(self.step, {})[name] = share.cpu()

    def layer_means(self, step: int) -> dict[str, float]:
        """Module name -> the map's mean over pixels at ``step`` (step 0 equals the engine's
        ``AppliedConcept.attention_per_layer``)."""
        return {name: float(m.mean()) for name, m in self.maps[step].items()}

    def stacked(self, resolution: int | None) -> np.ndarray:
        """(steps, h, w): per step, the mean over the layers with ``resolution`` pixels
        (default: the most pixels)."""
        if not self.maps:
            raise RuntimeError("no cross-attention call was recorded")
        sizes = sorted({m.shape[0] for per_step in self.maps.values() for m in per_step.values()})
        n = resolution if resolution is not None else sizes[-1]
        if n not in sizes:
            raise ValueError(f"no cross-attention layer has {n} pixels (have {sizes})")
        lh, lw = self.latent_hw
        factor = math.sqrt(lh * lw / n)
        h, w = max(1, round(lh / factor)), max(1, round(lw / factor))
        out = []
        for step in sorted(self.maps):
            layers = [m for m in self.maps[step].values() if m.shape[0] == n]
            out.append(torch.stack(layers).mean(0).view(h, w).numpy())
        return np.stack(out)


def concept_recorder(pipe: Any, guard: Any, concept_id: str) -> _Recorder:
    """A context manager that records ``concept_id``'s maps in every call of ``pipe`` within
    it (guarded or not); read them with ``.stacked()`` or ``.layer_means(step)``."""
    plan = guard.plan_for(pipe)
    ids = [spec.id for spec in plan.concepts]
    if concept_id not in ids:
        raise ConceptError(f"not in the active policy (concepts: {', '.join(ids) or 'none'})", concept_id=concept_id)
    row = ids.index(concept_id)
    embeds = plan.embeddings[row].to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    modules = {name.removesuffix(".processor"): embeds for name in plan.layer_names}
    return _Recorder(pipe, modules, plan.token_positions[row])


def record_concept_maps(
    pipe: Any, guard: Any, concept_id: str, call: dict[str, Any], *, guarded: bool, resolution: int | None = None
) -> tuple[Any, np.ndarray]:
    """Run ``pipe(**call)`` (through ``guard`` when ``guarded``) and record ``concept_id``'s
    attention maps over the steps; returns (the pipeline output, maps (steps, h, w))."""
    with concept_recorder(pipe, guard, concept_id) as recorder:
        output = guard(pipe, **call) if guarded else pipe(**call)
    return output, recorder.stacked(resolution)


def explain(
    pipe: Any,
    guard: Any,
    prompt: str,
    *,
    concept: str | None = None,
    seed: int = 0,
    steps: int = 20,
    columns: int = 8,
    resolution: int | None = None,
    **call: Any,
) -> Explanation:
    """Generate ``prompt`` unguarded and guarded with the same seed, record ``concept``'s
    maps (default: the policy's first concept) in both, and draw the figure."""
    plan = guard.plan_for(pipe)
    if not plan.concepts:
        raise ConceptError("the policy has no concept to explain")
    concept_id = concept or plan.concepts[0].id
    scale = next((float(s.scale) for s in plan.concepts if s.id == concept_id), 0.0)
    images = []
    maps = []
    for guarded in (False, True):
        kwargs = dict(prompt=prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **call)
        output, recorded = record_concept_maps(pipe, guard, concept_id, kwargs, guarded=guarded, resolution=resolution)
        images.append(_first_image(output))
        maps.append(recorded)
    figure = render_figure(images[0], images[1], maps[0], maps[1], columns=columns,
                           title=f"{_short(prompt)!r}: concept {concept_id!r} (scale {scale:g}), policy "
                                 f"{guard.policy.name!r}, seed {seed}")
    return Explanation(concept_id, scale, prompt, seed, images[0], images[1], maps[0], maps[1], figure)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_image(output: Any) -> Image.Image:
    from .verifiers import _output_images, _to_pil

    return _to_pil(_output_images(output))[0]


# -- drawing --------------------------------------------------------------------------------

# "inferno"-like anchors, dark (0) to bright (1)
_ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                     [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=float)


def _colour(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB by linear interpolation between the anchors."""
    x = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (x - lo)[..., None]
    return ((1 - t) * _ANCHORS[lo] + t * _ANCHORS[lo + 1]).round().astype(np.uint8)


def render_figure(
    before: Image.Image,
    after: Image.Image,
    maps_before: np.ndarray,
    maps_after: np.ndarray,
    *,
    columns: int = 8,
    cell: int = 96,
    title: str = "",
) -> Image.Image:
    """Two rows (unguarded, guarded): the image, then the maps at ``columns`` evenly spaced
    steps, on one shared colour scale (so the rows compare)."""
    total = maps_before.shape[0]
    shown = min(columns, total)
    picks = sorted({round(i * (total - 1) / max(1, shown - 1)) for i in range(shown)})  # first and last included
    low = min(float(maps_before.min()), float(maps_after.min()))
    top = max(float(maps_before.max()), float(maps_after.max()))
    span = max(top - low, 1e-12)
    font = ImageFont.load_default()
    label_w, head_h, foot_h, pad = 84, 34, 18, 4
    width = label_w + (1 + len(picks)) * (cell + pad)
    height = head_h + 2 * (cell + pad) + foot_h
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((pad, 2), title, fill="black", font=font)
    x0 = label_w + cell + pad
    draw.text((label_w, head_h - 14), "image", fill="black", font=font)
    for j, step in enumerate(picks):
        draw.text((x0 + j * (cell + pad), head_h - 14), f"step {step + 1}/{total}", fill="black", font=font)
    for r, (label, image, maps) in enumerate((("unguarded", before, maps_before), ("guarded", after, maps_after))):
        y = head_h + r * (cell + pad)
        draw.text((pad, y + cell // 2 - 6), label, fill="black", font=font)
        fig.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w, y))
        for j, step in enumerate(picks):
            tile = Image.fromarray(_colour((maps[step] - low) / span)).resize((cell, cell), Image.BILINEAR)
            fig.paste(tile, (x0 + j * (cell + pad), y))
    draw.text((pad, height - foot_h + 2), f"concept attention share per pixel, one colour scale: {low:.3g} (dark) to {top:.3g} (bright)",
              fill="black", font=font)
    return fig


# -- command line ---------------------------------------------------------------------------


def load_explain_pipeline(kind: str = "auto", weights: str | None = None) -> tuple[Any, str]:
    """(pipeline, description) for ``gie-guard explain --pipeline``: ``shapes`` needs the
    shapes-world weights; ``auto`` falls back to the tiny random pipeline without them."""
    if kind in ("auto", "shapes"):
        try:
            from .shapes import load_pipeline

            return load_pipeline(weights_dir=weights), f"the shapes-world model ({weights or 'gie_guard.shapes'})"
        except (FileNotFoundError, OSError) as exc:
            if kind == "shapes":
                raise FileNotFoundError(f"the shapes-world weights are not available: {exc}") from exc
    from .testing import tiny_sd_pipeline

    return tiny_sd_pipeline(sample_size=32), "a tiny random-weight SD 1.x pipeline (gie_guard.testing)"


def main(args: Any) -> int:
    """``gie-guard explain``: write the figure to ``args.out`` and say what it shows."""
    from .guard import Guard

    if args.steps < 1 or args.columns < 1:
        raise ValueError("--steps and --columns must be at least 1")
    pipe, description = load_explain_pipeline(args.pipeline, getattr(args, "weights", None))
    guard = Guard(policy=args.policy, registry=_private_registry())
    result = explain(pipe, guard, args.prompt, concept=args.concept, seed=args.seed, steps=args.steps,
                     columns=args.columns)
    result.figure.save(args.out)
    drop = 1.0 - float(result.maps_after.mean()) / max(float(result.maps_before.mean()), 1e-12)
    print(f"model: {description}")
    print(f"wrote {args.out}: concept {result.concept_id!r} (scale {result.scale:g}) over {args.steps} steps; "
          f"mean attention share {result.maps_before.mean():.4f} unguarded, {result.maps_after.mean():.4f} guarded "
          f"({drop:+.1%} lower)")
    return 0


def _private_registry() -> Any:
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()  # a one-off command exports nothing
