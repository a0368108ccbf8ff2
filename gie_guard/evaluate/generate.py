"""Generation for ``gie-guard evaluate``: every prompt row unguarded and under each policy,
with the same seeds, stored so that a rerun with the same output folder skips what is done.

Store layout (``DIR``)::

    images/<variant>/<set>-<index>-s<seed>-<key8>.png   one PNG per image (lossless uint8)
    records.jsonl                                        one JSON line per finished image

An image's ``key`` hashes everything it depends on: the model's identity (weights digest,
device type, dtype), the variant (``none`` or the policy's content hash), the prompt, the
seed, steps and guidance. A record is written after its PNG, and a record counts only when
its PNG exists, so a run killed at any point resumes with at most one batch lost. A changed
setting changes keys: those images are generated anew, the old ones stay on disk unused.

Images are decoded as ``output_type="np"`` and rounded to uint8 (``round(x * 255)``), as
``benchmarks/erasure.py`` does, so both judge the same pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .prompts import PromptRow

if TYPE_CHECKING:
    from ..report import GuardReport

__all__ = ["JsonlCache", "Store", "Variant", "image_key", "run_generation"]

UNGUARDED = "unguarded"


@dataclass(frozen=True)
class Variant:
    """How one image of a row is generated: ``guard`` None for the unguarded image."""

    label: str  # "unguarded" or the policy's label
    hash: str  # "none" or the policy's content hash
    guard: Any = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.label)[:48] + ("" if self.guard is None else f"-{self.hash[:8]}")


def image_key(model_identity: str, variant_hash: str, row: PromptRow, steps: int, guidance: float | None) -> str:
    text = json.dumps([model_identity, variant_hash, row.prompt, row.seed, steps, guidance], ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def read_records(path: pathlib.Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file that has a ``key`` (none when there is no file);
    a line cut short by a killed run is passed over."""
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "key" in rec:
            yield rec


class Store:
    """Finished images of an output folder (``records.jsonl`` and the PNGs it names)."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.records_path = root / "records.jsonl"
        self.records: dict[str, dict[str, Any]] = {}
        for rec in read_records(self.records_path):
            if (root / rec.get("file", "")).is_file():
                self.records[rec["key"]] = rec

    def done(self, key: str) -> bool:
        return key in self.records

    def add(self, images: np.ndarray, records: Sequence[dict[str, Any]]) -> None:
        lines = []
        for image, rec in zip(images, records):
            rec["sha256"] = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:32]  # of the pixels
            path = self.root / rec["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.png")
            from PIL import Image

            Image.fromarray(image).save(tmp)
            os.replace(tmp, path)
            lines.append(json.dumps(rec, ensure_ascii=True))
            self.records[rec["key"]] = rec
        with self.records_path.open("a", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())

    def image(self, key: str) -> np.ndarray:
        from PIL import Image

        with Image.open(self.root / self.records[key]["file"]) as im:
            return np.asarray(im.convert("RGB"))


class JsonlCache:
    """Values computed from stored images (similarities, CLIP scores), one JSON line each,
    keyed by a string: reruns compute only what is missing."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.values: dict[str, Any] = {rec["key"]: rec.get("value") for rec in read_records(path)}

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def update(self, items: dict[str, Any]) -> None:
        if not items:
            return
        self.values.update(items)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps({"key": k, "value": v}) + "\n" for k, v in items.items()))
            fh.flush()
            os.fsync(fh.fileno())


@dataclass(frozen=True)
class Job:
    row: PromptRow
    variant: Variant
    key: str


def plan_jobs(rows: Iterable[PromptRow], variants: Sequence[Variant], identity: str, steps: int,
              guidance: float | None) -> list[list[Job]]:
    """For every row, one job per variant (unguarded first)."""
    return [[Job(row, v, image_key(identity, v.hash, row, steps, guidance)) for v in variants] for row in rows]


def run_generation(
    pipe: Any,
    store: Store,
    jobs: list[list[Job]],
    *,
    steps: int,
    guidance: float | None,
    batch_size: int,
    progress: bool = True,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, int]:
    """Generate every job not yet in ``store``. Rows go in batches; each batch is generated
    unguarded and under each policy (the order alternating between batches), so an interrupted
    run leaves complete pairs and the timings of the variants are interleaved. Returns counts: generated, reused."""
    import torch
    from tqdm.auto import tqdm

    todo: list[list[Job]] = []
    scheduled: set[str] = set()
    for row_jobs in jobs:  # a key twice (the same prompt and seed twice) is generated once
        mine = [j for j in row_jobs if not store.done(j.key) and j.key not in scheduled]
        scheduled.update(j.key for j in mine)
        if mine:
            todo.append(mine)
    total = sum(len(t) for t in todo)
    reused = len({j.key for r in jobs for j in r}) - total
    if reused:
        log(f"resuming: {reused} image(s) already in {store.root}, {total} to generate")
    if not total:
        return {"generated": 0, "reused": reused}
    _warm_up(pipe, todo[0][0].row, guidance)
    bar = tqdm(total=total, unit="image", desc="generating", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            variants = list(dict.fromkeys(j.variant for row_jobs in chunk for j in row_jobs))
            if (start // batch_size) % 2:
                variants.reverse()  # alternate the order, so neither variant always runs warm
            for variant in variants:
                batch = [j for row_jobs in chunk for j in row_jobs if j.variant == variant]
                images, seconds, cpu, report = _call(pipe, variant, [j.row for j in batch], steps, guidance, torch)
                n = len(batch)
                records: list[dict[str, Any]] = []
                for job in batch:
                    rec = {
                        "key": job.key, "set": job.row.set, "index": job.row.index, "line": job.row.line,
                        "seed": job.row.seed, "variant": variant.label, "variant_hash": variant.hash,
                        "file": f"images/{variant.slug}/{job.row.set}-{job.row.index:05d}-s{job.row.seed}-{job.key[:8]}.png",
                        "seconds": seconds / n, "cpu_seconds": cpu / n, "batch": n,
                    }
                    if report is not None:
                        rec.update(added_seconds=report.added_seconds / n, call_seconds=report.call_seconds / n,
                                   steps_inhibited=len(report.steps_inhibited), total_steps=report.total_steps,
                                   family=report.family)
                    records.append(rec)
                store.add(images, records)
                bar.update(n)
    finally:
        bar.close()
    return {"generated": total, "reused": reused}


def _kwargs(rows: Sequence[PromptRow], steps: int, guidance: float | None, torch: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        prompt=[r.prompt for r in rows],
        num_inference_steps=steps,
        generator=[torch.Generator().manual_seed(r.seed) for r in rows],  # CPU generators: same noise on any device
        output_type="np",
    )
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    return kwargs


def _to_uint8(images: Any) -> np.ndarray:
    array = np.asarray(images, dtype=np.float32)
    return np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)


def _call(
    pipe: Any, variant: Variant, rows: Sequence[PromptRow], steps: int, guidance: float | None, torch: Any
) -> tuple[np.ndarray, float, float, GuardReport | None]:
    kwargs = _kwargs(rows, steps, guidance, torch)
    cpu_started = time.process_time()
    started = time.perf_counter()
    if variant.guard is None:
        output = pipe(**kwargs)
        report = None
        images = output.images
    else:
        result = variant.guard.generate(pipe, **kwargs)
        report = result.report
        images = result.images
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started  # this process's CPU time: less sensitive to a shared machine
    return _to_uint8(images), seconds, cpu, report


def _warm_up(pipe: Any, row: PromptRow, guidance: float | None) -> None:
    """One short unguarded call before timing (first-call allocations, kernel selection)."""
    import torch

    kwargs = _kwargs([row], 2, guidance, torch)
    pipe(**kwargs)
