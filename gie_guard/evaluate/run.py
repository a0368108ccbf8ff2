"""The evaluation run: prompt sets, policies, judge and model are checked first (cheap errors
before seconds go into loading a model), then every row is generated unguarded and under each
policy, judged, measured, and written as ``results.json``, ``report.md`` and ``report.html``."""

from __future__ import annotations

import datetime
import functools
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigurationError
from .prompts import PromptRow, PromptSet, parse_seeds, parse_where, read_prompt_set

if TYPE_CHECKING:
    from .clipscore import ClipScorer
    from .generate import Job, Store, Variant

__all__ = ["EvaluateConfig", "evaluate"]


@dataclass
class EvaluateConfig:
    model: str
    policies: Sequence[str]
    judge: str
    out: pathlib.Path
    unsafe: str | None = None
    benign: str | None = None
    unsafe_column: str = "prompt"
    benign_column: str = "prompt"
    unsafe_where: Sequence[str] = ()
    limit: int | None = None
    benign_limit: int | None = None
    seeds: str = "0:1"
    seed_column: str = "evaluation_seed"
    steps: int | None = None
    guidance: float | None = None
    device: str | None = None
    dtype: str | None = None
    batch_size: int | None = None
    labels: Sequence[str] = ()
    clip: str | None = None
    thumbnails: int = 8
    show_unsafe: bool = False
    keep_safety_checker: bool = False
    progress: bool = True
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class _NoVerdict:
    """Stands in for a policy's ``verify:`` verifiers during evaluation: the judge measures
    what the inhibition leaves, which a verifier's blur or block would hide."""

    def __call__(self, images: Sequence[Any]) -> list[set[str]]:
        return [set() for _ in images]


def _check(config: EvaluateConfig) -> None:
    if not config.unsafe and not config.benign:
        raise ConfigurationError("give --unsafe CSV, --benign CSV or both")
    if not config.policies:
        raise ConfigurationError("give at least one --policy")
    for name, value in (("--limit", config.limit), ("--benign-limit", config.benign_limit),
                        ("--steps", config.steps), ("--batch-size", config.batch_size)):
        if value is not None and value < 1:
            raise ConfigurationError(f"{name} must be at least 1, got {value}")
    if config.thumbnails < 0:
        raise ConfigurationError(f"--thumbnails must be at least 0, got {config.thumbnails}")
    if config.clip and not config.benign:
        raise ConfigurationError("--clip scores the benign set: give --benign CSV too")
    if config.out.exists() and not config.out.is_dir():
        raise ConfigurationError(f"--out {config.out}: exists and is not a folder")
    from ..policy import read_policy

    for spec in config.policies:
        read_policy(spec)  # a missing or invalid policy file fails now, before a judge or model loads (no torch)


def evaluate(config: EvaluateConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run an evaluation; returns the results (also written to ``config.out``)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.perf_counter()
    _check(config)
    seeds = parse_seeds(config.seeds, config.seed_column)
    where = [parse_where(w) for w in config.unsafe_where]
    sets: dict[str, PromptSet] = {}
    if config.unsafe:
        sets["unsafe"] = read_prompt_set(config.unsafe, name="unsafe", column=config.unsafe_column, seeds=seeds,
                                         where=where, limit=config.limit, option="--unsafe")
    if config.benign:
        sets["benign"] = read_prompt_set(config.benign, name="benign", column=config.benign_column, seeds=seeds,
                                         limit=config.benign_limit or config.limit, option="--benign")

    if config.clip:
        from .clipscore import clip_kind

        clip_kind(config.clip)  # a wrong folder fails now, not after the generation

    from .judge import Judge

    judge = Judge(config.judge, labels=config.labels)
    guards = _guards(config.policies, judge)

    from .models import load_model

    model = load_model(config.model, device=config.device, dtype=config.dtype,
                       keep_safety_checker=config.keep_safety_checker)
    steps = config.steps or model.steps
    guidance = config.guidance if config.guidance is not None else model.guidance
    batch_size = config.batch_size or model.batch_size
    log(f"model: {model.description} ({type(model.pipe).__name__}, family {model.family}, {model.device}, {model.dtype})")
    for s in sets.values():
        log(f"{s.name} set: {s.prompts} prompt(s) x seeds {seeds} = {len(s.rows)} row(s) from {s.file}")
    for g in guards:
        log(f"policy {g['label']}: " + ", ".join(f"{c.concept_id} -> {'/'.join(c.labels)}" for c in g["concepts"]))

    from .generate import UNGUARDED, Store, Variant, plan_jobs, run_generation

    config.out.mkdir(parents=True, exist_ok=True)
    store = Store(config.out)
    variants = [Variant(UNGUARDED, "none")] + [Variant(g["label"], g["hash"], g["guard"]) for g in guards]
    rows = [r for s in sets.values() for r in s.rows]
    jobs = plan_jobs(rows, variants, model.identity, steps, guidance)
    counts = run_generation(model.pipe, store, jobs, steps=steps, guidance=guidance, batch_size=batch_size,
                            progress=config.progress, log=log)

    keys = dict.fromkeys(j.key for row_jobs in jobs for j in row_jobs)
    labels = judge.judge(config.out, {k: functools.partial(store.image, k) for k in keys}, progress=config.progress)

    clip = None
    if config.clip:
        from .clipscore import load_clip

        clip = load_clip(config.clip, device=model.device)

    results = _measure(config, sets, jobs, variants, guards, store, labels, clip, model.device)
    results.update(
        tool="gie-guard evaluate",
        version=_version(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=config.command,
        model=model.describe(),
        judge={"name": judge.spec, "labels_override": list(judge.override)},
        settings={"steps": steps, "guidance": guidance, "seeds": str(seeds), "batch_size": batch_size,
                  "device": model.device, "dtype": model.dtype, "clip": config.clip, **config.extra},
        sets={name: s.describe() for name, s in sets.items()},
        run={"generated": counts["generated"], "reused": counts["reused"],
             "wall_seconds": round(time.perf_counter() - started, 2)},
    )
    from .report import write_reports

    write_reports(config, results, store, labels, {g["label"]: g for g in guards})
    return results


def _guards(specs: Sequence[str], judge: Any) -> list[dict[str, Any]]:
    from prometheus_client import CollectorRegistry

    from ..guard import Guard
    from ..metrics import GuardMetrics
    from ..policy import load_policy

    out: list[dict[str, Any]] = []
    for spec in specs:
        snapshot = load_policy(spec)  # a bad policy is reported before any model loads
        names = {c.verify.verifier for c in snapshot.policy.concepts if c.verify is not None}
        guard = Guard(policy=spec, metrics=GuardMetrics(CollectorRegistry()),
                      verifiers={name: _NoVerdict() for name in names})
        snap = guard.snapshot
        same = next((g for g in out if g["hash"] == snap.content_hash), None)
        if same is not None:
            raise ConfigurationError(f"--policy {spec} and --policy {same['spec']} are the same policy (content hash)")
        label = snap.name
        if any(g["label"] == label for g in out):
            label = f"{label}#{len(out) + 1}"
        concepts = judge.concept_labels(snap)
        out.append({"spec": spec, "label": label, "hash": snap.content_hash, "guard": guard, "snapshot": snap,
                    "concepts": concepts, "verifiers_off": sorted(names)})
    return out


def _measure(
    config: EvaluateConfig,
    sets: dict[str, PromptSet],
    jobs: list[list[Job]],
    variants: list[Variant],
    guards: list[dict[str, Any]],
    store: Store,
    labels: dict[str, frozenset[str]],
    clip: ClipScorer | None,
    device: str,
) -> dict[str, Any]:
    from .measures import benign_measures, cost_measures, unsafe_measures

    by_row: dict[PromptRow, dict[str, str]] = {row_jobs[0].row: {j.variant.label: j.key for j in row_jobs}
                                               for row_jobs in jobs}
    policies: list[dict[str, Any]] = []
    pairs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for g in guards:
        groups: dict[str, list[str]] = {}
        for c in g["concepts"]:
            for label in c.labels:
                groups.setdefault(label, []).append(c.concept_id)
        wanted = set(groups)
        entry: dict[str, Any] = {
            "label": g["label"], "policy": g["spec"], "name": g["snapshot"].name, "content_hash": g["hash"],
            "inhibit_steps": list(g["snapshot"].policy.inhibit_steps),
            "concepts": [{"id": c.concept_id, "text": c.text, "labels": list(c.labels), "label_rule": c.rule,
                          "scale": _scale(g["snapshot"], c.concept_id)} for c in g["concepts"]],
            "verifiers_switched_off": g["verifiers_off"],
        }
        pairs[g["label"]] = {}
        records_u: list[dict[str, Any]] = []
        records_g: list[dict[str, Any]] = []
        for name, s in sets.items():
            keys = [(r, by_row[r]["unguarded"], by_row[r][g["label"]]) for r in s.rows]
            before = [labels[u] for _, u, _ in keys]
            after = [labels[k] for _, _, k in keys]
            records_u += [store.records[u] for _, u, _ in keys]
            records_g += [store.records[k] for _, _, k in keys]
            items: list[dict[str, Any]] = [{"row": r, "unguarded": u, "guarded": k, "before": b, "after": a}
                     for (r, u, k), b, a in zip(keys, before, after)]
            if name == "unsafe":
                entry["unsafe"] = unsafe_measures(before, after, {k: tuple(v) for k, v in groups.items()})
                for it in items:
                    it["removed"] = bool(it["before"] & wanted) and not it["after"] & wanted
                    it["residual"] = bool(it["after"] & wanted)
            else:
                sim = _similarities(config.out, store, [(u, k) for _, u, k in keys], device)
                same = np.array([_identical(store, u, k) for _, u, k in keys])
                scores = None
                if clip is not None:
                    prompts = [r.prompt for r, _, _ in keys]
                    scores = (_clip_scores(config.out, clip, store, [u for _, u, _ in keys], prompts),
                              _clip_scores(config.out, clip, store, [k for _, _, k in keys], prompts))
                entry["benign"] = benign_measures(before, after, wanted, sim, same, scores)
                for it, v in zip(items, sim):
                    it["ms_ssim"] = float(v)
            pairs[g["label"]][name] = items
        entry["cost"] = cost_measures(records_u, records_g)
        policies.append(entry)
    return {"policies": policies, "_pairs": pairs}


def _identical(store: Any, a: str, b: str) -> bool:
    ha, hb = store.records[a].get("sha256"), store.records[b].get("sha256")
    if ha and hb:
        return bool(ha == hb)
    return a == b or bool(np.array_equal(store.image(a), store.image(b)))


def _similarities(root: pathlib.Path, store: Any, pairs: list[tuple[str, str]], device: str, batch: int = 16) -> np.ndarray:
    """MS-SSIM of each (unguarded, guarded) pair, cached in ``DIR/similarity.jsonl``."""
    from .generate import JsonlCache
    from .measures import ms_ssim

    cache = JsonlCache(root / "similarity.jsonl")
    todo = list(dict.fromkeys(f"{u}:{g}" for u, g in pairs if f"{u}:{g}" not in cache))
    for i in range(0, len(todo), batch):
        chunk = [k.split(":") for k in todo[i : i + batch]]
        a = np.stack([store.image(u) for u, _ in chunk])
        b = np.stack([store.image(g) for _, g in chunk])
        cache.update({f"{u}:{g}": float(v) for (u, g), v in zip(chunk, ms_ssim(a, b, device))})
    return np.array([cache[f"{u}:{g}"] for u, g in pairs], dtype=np.float64)


def _clip_scores(root: pathlib.Path, clip: Any, store: Any, keys: list[str], prompts: list[str], batch: int = 16) -> np.ndarray:
    """CLIP score of each image with its prompt, cached in ``DIR/clipscore.jsonl`` per model."""
    import hashlib

    from .generate import JsonlCache

    cache = JsonlCache(root / "clipscore.jsonl")
    tag = hashlib.sha256(str(pathlib.Path(clip.path).resolve()).encode()).hexdigest()[:12]
    ids = [f"{tag}:{k}:{hashlib.sha256(p.encode()).hexdigest()[:16]}" for k, p in zip(keys, prompts)]
    todo = list(dict.fromkeys(i for i in ids if i not in cache))
    where = {i: (k, p) for i, k, p in zip(ids, keys, prompts)}
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        values = clip(np.stack([store.image(where[i][0]) for i in chunk]), [where[i][1] for i in chunk])
        cache.update({i: float(v) for i, v in zip(chunk, values)})
    return np.array([cache[i] for i in ids], dtype=np.float64)


def _scale(snapshot: Any, concept_id: str) -> Any:
    for c in snapshot.policy.concepts:
        if c.id == concept_id:
            return c.scale if isinstance(c.scale, (int, float)) else "auto"
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gie-guard")
    except PackageNotFoundError:
        return "(source checkout)"
