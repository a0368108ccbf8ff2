"""Train a scale adapter: label prompts with a judge, then fit the MLP.

Labelling (one prompt, one seed): generate the unguarded image while measuring the
concept's first-step features, then the guarded image at every scale of the grid (same
seed, same window). The label is chosen by this rule, in order (docs/adapters.md):

1. ``absent``: the judge does not find the concept in the unguarded image -> the smallest
   grid scale (there is nothing to erase; the grid's low end is the floor you chose).
2. ``erased``: the smallest scale at which the judge finds the concept gone *and* the
   preservation score is at least ``preserve_bound``.
3. ``survives``: the concept survives at every scale that keeps the image intact -> the
   largest scale whose preservation is still at least the bound (the most erasure that
   keeps the image).
4. ``broken``: no scale keeps preservation above the bound -> the smallest grid scale.

Each concept token of the prompt becomes one training row (features: one value per
cross-attention layer; target: the prompt's label). Fitting: MSE, Adam, full batch,
``epochs`` (default 2,000) on standardised features and range-normalised targets; a
held-out fifth (when there are at least 10 prompts) measures the error against always
predicting the mean label, then the final model is fitted on everything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import ConceptSpec, StepWindow, compile_plan, guarded_call
from ..errors import AdapterError
from .features import measure_features
from .format import save_adapter
from .judges import Judge, Preservation
from .model import Fingerprint, MLPAdapter, ScaleMLP

__all__ = ["LabelledPrompt", "TrainingConfig", "fit_mlp", "label_prompts", "train_adapter"]


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    concept: str
    scales: tuple[float, ...]
    category: str = "object"
    name: str | None = None
    steps: int = 20
    guidance_scale: float = 5.0
    window: tuple[float, float] = (0.0, 1.0)
    preserve_bound: float = 0.75
    seed: int = 0
    epochs: int = 2000
    learning_rate: float = 1e-3
    batch_size: int = 16
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        scales = tuple(sorted(float(s) for s in self.scales))
        if not scales or any(not math.isfinite(s) or s < 0 for s in scales) or len(set(scales)) != len(scales):
            raise AdapterError(f"the scale grid needs distinct finite numbers >= 0, got {self.scales!r}")
        object.__setattr__(self, "scales", scales)
        StepWindow(*self.window)


@dataclass
class LabelledPrompt:
    prompt: str
    seed: int
    features: list[list[float]]  # (tokens, L)
    present_unguarded: bool
    present: list[bool]  # per grid scale
    preservation: list[float]  # per grid scale
    label: float = 0.0
    rule: str = ""


def choose_label(scales: Sequence[float], present_unguarded: bool, present: Sequence[bool], preservation: Sequence[float], bound: float) -> tuple[float, str]:
    """The labelling rule of this module's docstring."""
    if not present_unguarded:
        return scales[0], "absent"
    intact = [i for i, p in enumerate(preservation) if p >= bound]
    for i in intact:
        if not present[i]:
            return scales[i], "erased"
    if intact:
        return scales[intact[-1]], "survives"
    return scales[0], "broken"


def _images(output: Any) -> np.ndarray:
    return np.round(np.asarray(output.images) * 255).clip(0, 255).astype(np.uint8)


def _call_kwargs(config: TrainingConfig) -> dict[str, Any]:
    kw: dict[str, Any] = dict(num_inference_steps=config.steps, guidance_scale=config.guidance_scale, output_type="np")
    if config.height:
        kw["height"] = config.height
    if config.width:
        kw["width"] = config.width
    return kw


@torch.no_grad()
def label_prompts(
    pipe: Any, prompts: Sequence[str], config: TrainingConfig, judge: Judge, preservation: Preservation, *,
    progress: bool = True,
) -> list[LabelledPrompt]:
    """Generate and judge every prompt at every grid scale; label each by the rule."""
    from tqdm.auto import tqdm

    kw = _call_kwargs(config)
    seeds = [config.seed + i for i in range(len(prompts))]
    bar = tqdm(total=len(prompts) * (1 + len(config.scales)), unit="image", desc=f"labelling {config.concept!r}", disable=not progress)
    feats = []
    for prompt, seed in zip(prompts, seeds):  # one at a time (features are per call), one UNet step each
        feats.append(measure_features(pipe, config.concept, first_step_only=True, prompt=prompt,
                                      generator=torch.Generator().manual_seed(seed), **kw)[1])
    refs = []
    for lo in range(0, len(prompts), config.batch_size):  # the unguarded images, batched
        batch = list(prompts[lo : lo + config.batch_size])
        gens = [torch.Generator().manual_seed(s) for s in seeds[lo : lo + config.batch_size]]
        refs.append(_images(pipe(prompt=batch, generator=gens, **kw)))
        bar.update(len(batch))
    refs_arr = np.concatenate(refs)
    present_ref = judge(refs_arr, config.concept)
    present = np.zeros((len(prompts), len(config.scales)), dtype=bool)
    kept = np.zeros((len(prompts), len(config.scales)))
    for j, scale in enumerate(config.scales):
        plan = compile_plan(pipe, [ConceptSpec("concept", config.concept, scale)], StepWindow(*config.window))
        guarded = []
        for lo in range(0, len(prompts), config.batch_size):
            batch = list(prompts[lo : lo + config.batch_size])
            gens = [torch.Generator().manual_seed(s) for s in seeds[lo : lo + config.batch_size]]
            with guarded_call(pipe, plan):
                guarded.append(_images(pipe(prompt=batch, generator=gens, **kw)))
            bar.update(len(batch))
        images = np.concatenate(guarded)
        present[:, j] = judge(images, config.concept)
        kept[:, j] = preservation(refs_arr, images, config.concept)
    bar.close()
    rows = []
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        row = LabelledPrompt(
            prompt, seed, feats[i].tolist(), bool(present_ref[i]), [bool(x) for x in present[i]], [float(x) for x in kept[i]]
        )
        row.label, row.rule = choose_label(config.scales, row.present_unguarded, row.present, row.preservation, config.preserve_bound)
        rows.append(row)
    return rows


def fit_mlp(
    features: torch.Tensor, labels: torch.Tensor, scale_range: tuple[float, float], *, epochs: int = 2000, lr: float = 1e-3, seed: int = 0
) -> tuple[ScaleMLP, torch.Tensor, torch.Tensor, float]:
    """Fit ``L -> 64 -> 32 -> 1`` by MSE; returns the model, feature mean and std, and the
    final training MSE in scale units squared."""
    lo, hi = scale_range
    span = (hi - lo) or 1.0
    x = features.float()
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1])
    x = (x - mean) / std
    y = (labels.float() - lo) / span
    torch.manual_seed(seed)
    model = ScaleMLP(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
        opt.step()
    model.eval()
    with torch.no_grad():
        mse = float(torch.nn.functional.mse_loss(model(x), y)) * span * span
    return model, mean, std, mse


def _rows_to_xy(rows: Sequence[LabelledPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for r in rows:
        for token in r.features:
            xs.append(token)
            ys.append(r.label)
    return torch.tensor(xs, dtype=torch.float32), torch.tensor(ys, dtype=torch.float32)


def train_adapter(
    pipe: Any, prompts: Sequence[str], config: TrainingConfig, judge: Judge, preservation: Preservation, *,
    out: str | Path | None = None,
    report_path: str | Path | None = None,
    progress: bool = True,
    judge_name: str | None = None,
) -> tuple[MLPAdapter, dict[str, Any]]:
    """Label ``prompts``, fit the adapter, and (optionally) write the adapter file and the
    training report (JSON). Returns both."""
    import json

    if len(prompts) < 2:
        raise AdapterError("adapter training needs at least 2 prompts")
    started = time.perf_counter()
    rows = label_prompts(pipe, prompts, config, judge, preservation, progress=progress)
    labelled = time.perf_counter()
    scale_range = (config.scales[0], config.scales[-1])
    validation: dict[str, Any] = {}
    if len(rows) >= 10:
        order = np.random.default_rng(config.seed).permutation(len(rows))
        held = set(order[: max(2, len(rows) // 5)].tolist())
        train = [r for i, r in enumerate(rows) if i not in held]
        test = [r for i, r in enumerate(rows) if i in held]
        xt, yt = _rows_to_xy(train)
        xv, yv = _rows_to_xy(test)
        model, mean, std, _ = fit_mlp(xt, yt, scale_range, epochs=config.epochs, lr=config.learning_rate, seed=config.seed)
        probe = MLPAdapter("v", Fingerprint(("x",) * xt.shape[1], (0,) * xt.shape[1]), (), scale_range, model, mean, std)
        pred = probe.predict(xv).clamp(*scale_range)
        validation = {
            "held_out_prompts": len(test),
            "mae": float((pred - yv).abs().mean()),
            "mae_of_constant_mean_label": float((yt.mean() - yv).abs().mean()),
        }
    x, y = _rows_to_xy(rows)
    model, mean, std, mse = fit_mlp(x, y, scale_range, epochs=config.epochs, lr=config.learning_rate, seed=config.seed)
    fitted = time.perf_counter()
    rules = {k: sum(r.rule == k for r in rows) for k in ("absent", "erased", "survives", "broken")}
    labels = [r.label for r in rows]
    summary = {
        "concept": config.concept,
        "judge": judge_name or type(judge).__name__,
        "preservation": type(preservation).__name__,
        "prompts": len(rows),
        "rows": int(len(y)),
        "scale_grid": list(config.scales),
        "preserve_bound": config.preserve_bound,
        "steps": config.steps,
        "guidance_scale": config.guidance_scale,
        "window": list(config.window),
        "seed": config.seed,
        "epochs": config.epochs,
        "label_rules": rules,
        "label_counts": {f"{s:g}": labels.count(s) for s in config.scales},
        "train_mse": mse,
        "validation": validation,
        "labelling_seconds": round(labelled - started, 2),
        "fitting_seconds": round(fitted - labelled, 2),
    }
    name = config.name or f"{config.concept.replace(' ', '-')}"
    adapter = MLPAdapter(
        name=name,
        fingerprint=Fingerprint.of_pipeline(pipe),
        categories=(config.category,),
        scale_range=scale_range,
        model=model,
        feature_mean=mean,
        feature_std=std,
        concepts=(config.concept,),
        training=summary,
    )
    if out is not None:
        adapter = replace(adapter, path=str(save_adapter(adapter, out)))
    report = {"adapter": name, "file": adapter.path, "fingerprint_digest": adapter.fingerprint.digest, "config": asdict(config),
              "summary": summary, "prompts": [asdict(r) for r in rows]}
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(report, indent=1))
    return adapter, report
