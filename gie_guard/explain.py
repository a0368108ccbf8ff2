"""Pictures of what the guard does: a concept's attention maps over the denoising steps,
unguarded and guarded, beside the two images (in the manner of the GIE paper's Figure 1).

    from gie_guard.explain import explain
    result = explain(pipe, guard, "a red circle", concept="circle", seed=0, steps=20)
    result.figure.save("explain.png")

or ``gie-guard explain --prompt "a red circle" --policy shapes-demo --out explain.png``.

The maps come from the engine itself (it hands them to observers: gie_guard.engine.observing),
so a picture shows exactly the ``M_c`` the inhibitor uses, for every family: at every step and
attention site, the concept's map summed over its own token slots, averaged over heads, the
rows that carry the prompt and the sites of one resolution (the highest by default; ``sites``
picks some, e.g. blocks of a transformer, whose joint-attention blocks differ a lot). A value
is the share of a position's attention that falls on the concept's tokens: where the concept
"grows" in the image.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .engine import guarded_call, observing
from .errors import ConceptError, ConfigurationError

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
    """An engine observer (gie_guard.engine.MapObserver) keeping one concept's map per step and
    attention site: the share of each position's attention on the concept's own tokens,
    averaged over heads and the rows that carry the prompt."""

    def __init__(self, row: int, aspect: float = 1.0) -> None:
        self.row = row  # the concept's row in the plan
        self.aspect = aspect  # height / width of the images, to lay positions out in a grid
        self.maps: dict[int, dict[str, torch.Tensor]] = {}  # step -> site -> (N,)

    def on_maps(self, step: int, site: Any, shares: list[torch.Tensor]) -> None:
        self.maps.setdefault(step, {})[site.name] = shares[self.row].mean(dim=(0, 1)).float().cpu()

    def layer_means(self, step: int) -> dict[str, float]:
        """Site name -> the map's mean over positions at ``step`` (step 0 equals the engine's
        ``AppliedConcept.attention_per_layer``)."""
        return {name: float(m.mean()) for name, m in self.maps[step].items()}

    def site_names(self) -> list[str]:
        """The recorded sites, in the order the engine first ran them."""
        return list(dict.fromkeys(name for per_step in self.maps.values() for name in per_step))

    def stacked(self, resolution: int | None = None, sites: Sequence[str] | None = None) -> np.ndarray:
        """(steps, h, w): per step, the mean over the sites with ``resolution`` positions
        (default: the most), or over ``sites`` only (names as recorded, e.g.
        ``transformer_blocks.1.attn``, or their prefixes: ``transformer_blocks.1``)."""
        if not self.maps:
            raise RuntimeError("no attention site was recorded")
        chosen = self.select(sites)
        sizes = sorted({m.shape[0] for per_step in self.maps.values() for name, m in per_step.items() if name in chosen})
        n = resolution if resolution is not None else sizes[-1]
        if n not in sizes:
            raise ValueError(f"no attention site has {n} positions (have {sizes})")
        h = max(1, round(math.sqrt(n * self.aspect)))
        w = n // h
        out = []
        for step in sorted(self.maps):
            layers = [m for name, m in self.maps[step].items() if m.shape[0] == n and name in chosen]
            out.append(torch.stack(layers).mean(0)[: h * w].view(h, w).numpy())
        return np.stack(out)

    def select(self, sites: Sequence[str] | None) -> set[str]:
        """The recorded site names that ``sites`` names (all of them for None); a name that
        matches no site is an error that lists the sites."""
        names = self.site_names()
        if sites is None:
            return set(names)
        chosen: set[str] = set()
        for want in sites:
            hits = [n for n in names if n == want or n.startswith(want + ".")]
            if not hits:
                raise ConfigurationError(f"no attention site named {want!r} (sites: {', '.join(names)})")
            chosen.update(hits)
        return chosen


def _concept_row(plan: Any, concept_id: str) -> int:
    ids = [spec.id for spec in plan.concepts]
    if concept_id not in ids:
        raise ConceptError(f"not in the active policy (concepts: {', '.join(ids) or 'none'})", concept_id=concept_id)
    return ids.index(concept_id)


@contextlib.contextmanager
def concept_recorder(pipe: Any, guard: Any, concept_id: str, **call: Any) -> Iterator[_Recorder]:
    """Within the block, every guarded call of ``pipe`` records ``concept_id``'s maps; read them
    with ``.stacked()`` or ``.layer_means(step)``."""
    plan = guard.plan_for(pipe, **call)
    recorder = _Recorder(_concept_row(plan, concept_id), _aspect(call))
    with observing(pipe, recorder):
        yield recorder


def record_concept_maps(
    pipe: Any, guard: Any, concept_id: str, call: dict[str, Any], *, guarded: bool, resolution: int | None = None,
    sites: Sequence[str] | None = None,
) -> tuple[Any, np.ndarray]:
    """Run ``pipe(**call)`` (through ``guard`` when ``guarded``, else with nothing inhibited)
    and record ``concept_id``'s maps over the steps: (the pipeline output, maps (steps, h, w)),
    averaged over ``sites`` (default: every site of the highest resolution)."""
    plan = guard.plan_for(pipe, **call)
    recorder = _Recorder(_concept_row(plan, concept_id), _aspect(call))
    if guarded:
        with observing(pipe, recorder):
            output = guard(pipe, **call)
    else:
        with guarded_call(pipe, plan, observers=[recorder], inhibit=False):
            output = pipe(**call)
    return output, recorder.stacked(resolution, sites)


def _aspect(call: dict[str, Any]) -> float:
    height, width = call.get("height"), call.get("width")
    return float(height) / float(width) if height and width else 1.0


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
    sites: Sequence[str] | None = None,
    **call: Any,
) -> Explanation:
    """Generate ``prompt`` unguarded and guarded with the same seed, record ``concept``'s
    maps (default: the policy's first concept) in both, and draw the figure. ``sites``: the
    attention sites to average (names or prefixes as the engine reports them, e.g.
    ``transformer_blocks.1`` of an SD3 transformer); default: every site of the highest
    resolution (all blocks of a transformer, whose blocks differ a lot: docs/shapes.md)."""
    plan = guard.plan_for(pipe, **call)
    if not plan.concepts:
        raise ConceptError("the policy has no concept to explain")
    concept_id = concept or plan.concepts[0].id
    scale = next((float(s.scale) for s in plan.concepts if s.id == concept_id), 0.0)
    images = []
    maps = []
    for guarded in (False, True):
        kwargs = dict(prompt=prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **call)
        output, recorded = record_concept_maps(pipe, guard, concept_id, kwargs, guarded=guarded, resolution=resolution,
                                               sites=sites)
        images.append(_first_image(output))
        maps.append(recorded)
    figure = render_figure(images[0], images[1], maps[0], maps[1], columns=columns,
                           title=f"{_short(prompt)!r}: concept {concept_id!r} (scale {scale:g}), policy "
                                 f"{guard.policy.name!r}, seed {seed}"
                                 + (f", sites {_short(', '.join(sites), 80)}" if sites else ""))
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
    rgb: np.ndarray = ((1 - t) * _ANCHORS[lo] + t * _ANCHORS[lo + 1]).round().astype(np.uint8)
    return rgb


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
        fig.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (label_w, y))
        for j, step in enumerate(picks):
            tile = Image.fromarray(_colour((maps[step] - low) / span)).resize((cell, cell), Image.Resampling.BILINEAR)
            fig.paste(tile, (x0 + j * (cell + pad), y))
    draw.text((pad, height - foot_h + 2), f"concept attention share per pixel, one colour scale: {low:.3g} (dark) to {top:.3g} (bright)",
              fill="black", font=font)
    return fig
