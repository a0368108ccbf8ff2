"""How long a large policy takes to load, validate and deduplicate.

    HF_HUB_OFFLINE=1 python benchmarks/compile_policy.py [--concepts 1000] [--repeat 3]
    HF_HUB_OFFLINE=1 python benchmarks/compile_policy.py --scaling [--reference]
    HF_HUB_OFFLINE=1 python benchmarks/compile_policy.py --smoke     # both, tiny: seconds (CI)

The policy is generated from the real prompt sets in ../shared/data/ (read at run time):
object classes, artist names and frequent caption phrases, with a mix of fixed and auto
scales and an alias on every tenth concept. ``build_large_policy(n)`` is reusable (the plan
compilation benchmark extends this one).

The first mode also loads the policy in fresh processes with an empty and with a filled
on-disk embedding cache (``GIE_GUARD_CACHE_DIR``): cold is a first start, warm a restart.
``--scaling`` times deduplication alone on synthetic embeddings (1,000 / 2,000 / 10,000
texts; ``--reference`` also times the implementation before the rewrite, kept in
tests/test_policy_scale.py) and how fast the MAX_CONCEPT_TEXTS cap refuses 10,000 concepts.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from gie_guard.policy import (
    Policy,
    SentenceTransformerEmbedder,
    deduplicate,
    default_embedder,
    expand_concepts,
    content_hash,
    load_policy,
    read_policy,
)
from gie_guard.policy.yamlio import parse_policy_bytes

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

_STOP = set(
    "a an the of on in at to and with is are for by from its it this that near next two three some other while "
    "his her their there up down out over into very has have large small big little front top side sitting "
    "standing looking holding white black red blue green yellow brown one several many group each".split()
)


def _rows(name: str) -> list[dict[str, str]]:
    with open(DATA / name, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _vocabulary_phrases() -> Iterator[tuple[str, str]]:
    """Without ../shared/data (a bare clone, CI): the shipped anchor vocabulary, then pairs of
    its entries: real words, not the prompt corpora's distribution."""
    from gie_guard.policy.anchors import read_vocabulary, shipped_vocabulary

    words = read_vocabulary(shipped_vocabulary())
    yield from ((w, "object") for w in words)
    yield from ((f"{a} {b}", "object") for a in words for b in words if a != b)


def _phrases() -> Iterator[tuple[str, str]]:
    """(text, category) in order of preference: object classes, artists, caption phrases."""
    if not DATA.is_dir():
        print(f"note: {DATA} is not here; concept texts come from the shipped anchor vocabulary")
        yield from _vocabulary_phrases()
        return
    for row in _rows("small_imagenet_prompts.csv"):
        yield row["class"], "object"
    artist = re.compile(r"\bby ((?:[A-Z][\w'-]+ ?){2,3})")
    names: Counter[str] = Counter()
    for row in _rows("famous_art_prompts.csv") + _rows("unsafe-prompts4703.csv"):
        names.update(m.strip() for m in artist.findall(row["prompt"]))
    for name, _ in names.most_common():
        yield name, "style"
    words: Counter[str] = Counter()
    pairs: Counter[str] = Counter()
    for row in _rows("coco_30k.csv")[:10_000]:
        tokens = re.findall(r"[a-z]+", row["prompt"].lower())
        words.update(t for t in tokens if t not in _STOP and len(t) > 2)
        pairs.update(f"{a} {b}" for a, b in zip(tokens, tokens[1:]) if a not in _STOP and b not in _STOP)
    for (word, _), (pair, _) in zip(words.most_common(), pairs.most_common()):
        yield word, "object"
        yield pair, "object"


def build_large_policy(n: int = 1000) -> dict[str, Any]:
    """A valid policy dict with ``n`` concepts of realistic texts (needs ../shared/data/)."""
    seen: set[str] = set()
    concepts: list[dict[str, Any]] = []
    for text, category in _phrases():
        if text.casefold() in seen:
            continue
        seen.add(text.casefold())
        i = len(concepts)
        concept: dict[str, Any] = {"id": f"c{i:04d}", "text": text, "category": category,
                                   "scale": "auto" if i % 4 == 3 else float(1 + i % 5)}
        concepts.append(concept)
        if len(concepts) == n:
            break
    else:
        raise ValueError(f"the prompt sets give only {len(concepts)} distinct phrases")
    # Every tenth concept gets the next one's text as an alias, as operators do for synonyms.
    for i in range(0, n - 1, 10):
        concepts[i]["aliases"] = [concepts[i + 1]["text"] + " picture"]
    return {"version": "1", "name": "large", "description": f"{n} concepts generated from real prompts",
            "concepts": concepts}


def _time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


_CHILD = """
import json, sys, time
started = time.perf_counter()
import torch
torch.set_num_threads(1)
from gie_guard.policy import deduplicate, expand_concepts, load_policy, read_policy
imported = time.perf_counter()
flat = read_policy(sys.argv[1])
candidates = expand_concepts(flat.policy, flat.declared_at)
read = time.perf_counter()
kept, merges = deduplicate(candidates, threshold=flat.policy.dedup_threshold)
dedup = time.perf_counter()
snapshot = load_policy(sys.argv[1])
again = time.perf_counter()
print(json.dumps({"import": imported - started, "read": read - imported, "dedup": dedup - read,
                  "first_load": dedup - imported, "second_load": again - dedup, "kept": len(snapshot.concepts),
                  "model_loaded": "sentence_transformers" in sys.modules}))
"""


def _fresh_process(path: Path, cache: Path) -> dict[str, Any]:
    env = {**os.environ, "GIE_GUARD_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], env=env, capture_output=True, text=True,
                          timeout=900, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cache_rows(path: Path) -> list[tuple[str, str]]:
    """load_policy in new processes: empty cache (a first start) and filled cache (a restart)."""
    with tempfile.TemporaryDirectory() as cache:
        cold = _fresh_process(path, Path(cache))
        warm = _fresh_process(path, Path(cache))
    return [
        ("new process, empty cache: read + parse + validate", f"{cold['read']:.3f} s"),
        ("new process, empty cache: dedup (load model + embed + link)", f"{cold['dedup']:.3f} s"),
        ("new process, empty cache: load_policy total", f"{cold['first_load']:.3f} s"),
        ("new process, filled cache: read + parse + validate", f"{warm['read']:.3f} s"),
        ("new process, filled cache: dedup (cache + link, no model)", f"{warm['dedup']:.3f} s"),
        ("new process, filled cache: load_policy total", f"{warm['first_load']:.3f} s"
                                                          f" (model loaded: {warm['model_loaded']})"),
        ("same process again (reload, memory-warm)", f"{warm['second_load']:.3f} s"),
    ]


def synthetic(n: int, kind: str, seed: int = 0, dim: int = 384) -> Any:
    """Unit vectors. ``families``: many small groups of near-duplicates (what real policies
    look like, components of 2-60); ``worst``: two huge families whose members are all near
    the threshold of each other (components of n / 2, the worst case of complete linkage)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    count, spread = (max(1, n // 50), (0.45, 0.8)) if kind == "families" else (2, (0.4, 0.7))
    centers = rng.normal(size=(count, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    sigma = rng.uniform(*spread, size=(n, 1))
    vectors = centers[rng.integers(0, count, size=n)] + sigma * rng.normal(size=(n, dim)) / np.sqrt(dim)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _reference() -> Any:
    spec = importlib.util.spec_from_file_location(
        "policy_scale_reference", Path(__file__).resolve().parents[1] / "tests" / "test_policy_scale.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module._ref_complete_linkage


def scaling(sizes: list[int], reference: bool, reference_max: int) -> None:
    import numpy as np

    from gie_guard.policy.dedup import _linkage

    ref = _reference() if reference else None
    _linkage(synthetic(200, "families"), 0.3)  # warm up (first BLAS call, page faults)
    print(f"{'texts':>6}  {'embeddings':<9}  {'largest group':>13}  {'groups':>6}  {'new s':>7}  {'before s':>8}")
    for kind in ("families", "worst"):
        for n in sizes:
            vectors = synthetic(n, kind)
            # median of 3, interleaved with the reference where it is cheap enough to repeat
            repeat = 3 if n <= 2000 or kind == "families" and n <= 5000 else 1
            new_times, old_times = [], []
            for _ in range(repeat):
                started = time.perf_counter()
                groups, _ = _linkage(vectors, 0.3)
                new_times.append(time.perf_counter() - started)
                if ref is not None and n <= reference_max:
                    started = time.perf_counter()
                    old = ref(np.clip(1.0 - vectors @ vectors.T, 0.0, 2.0), 0.3)  # distances included, as in the new
                    old_times.append(time.perf_counter() - started)
                    assert sorted(old) == sorted(groups), "the implementations disagree"
            largest = max((len(g) for g in groups), default=1)
            before = f"{statistics.median(old_times):.2f}" if old_times else "-"
            print(f"{n:>6}  {kind:<9}  {largest:>13}  {len(groups):>6}  {statistics.median(new_times):>7.2f}  {before:>8}",
                  flush=True)
    doc = {"name": "big", "concepts": [{"id": f"c{i}", "text": f"concept {i}", "scale": 1.0} for i in range(10_000)]}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "big.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        from gie_guard.policy import load_policy

        times = []
        for _ in range(3):
            started = time.perf_counter()
            try:
                load_policy(path)
            except Exception as exc:  # the cap
                message = str(exc).split(": ", 1)[-1]
            times.append(time.perf_counter() - started)
        print(f"10,000-concept policy ({path.stat().st_size / 1024:.0f} KiB) refused in {statistics.median(times):.2f} s"
              f" (median of 3): {message}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a shared 2-core machine)")
    parser.add_argument("--scaling", action="store_true", help="time deduplication alone on synthetic embeddings")
    parser.add_argument("--sizes", default="1000,2000,10000", help="text counts for --scaling")
    parser.add_argument("--reference", action="store_true", help="also time the implementation before the rewrite")
    parser.add_argument("--reference-max", type=int, default=2000, help="largest size the reference is timed at")
    parser.add_argument("--smoke", action="store_true",
                        help="--scaling at 200 texts, then 20 concepts once: checks it runs, measures nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        scaling([200], reference=False, reference_max=0)
        args.concepts, args.repeat, args.scaling = 20, 1, False
    if args.scaling:
        scaling([int(n) for n in args.sizes.split(",")], args.reference, args.reference_max)
        return
    import torch

    from gie_guard.engine import ConceptSpec, StepWindow, compile_plan
    from gie_guard.shapes import load_pipeline

    torch.set_num_threads(args.threads)
    pipe = load_pipeline()  # the shapes-world pipeline: 16 cross-attention layers, MiniLM-based encoder

    data = build_large_policy(args.concepts)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "large.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
        raw = path.read_bytes()

        started = time.perf_counter()
        model = default_embedder()
        model.encode(["warm up"])
        load_model = time.perf_counter() - started

        r = args.repeat
        t_yaml, doc = _time(lambda: parse_policy_bytes(raw, file=str(path)), r)
        t_validate, _ = _time(lambda: Policy.model_validate(doc.data), r)
        t_read, flat = _time(lambda: read_policy(path), r)
        t_expand, candidates = _time(lambda: expand_concepts(flat.policy, flat.declared_at), r)
        t_hash, _ = _time(lambda: content_hash(flat.policy, candidates), r)
        texts = [c.text for c in candidates]
        t_embed, _ = _time(lambda: SentenceTransformerEmbedder().encode(texts), r)  # empty text cache each time
        t_link, (kept, merges) = _time(lambda: deduplicate(candidates, threshold=flat.policy.dedup_threshold,
                                                           embedder=model, cache_dir=False), r)
        t_cold, _ = _time(lambda: load_policy(path, embedder=SentenceTransformerEmbedder(), cache_dir=False), r)
        t_warm, snapshot = _time(lambda: load_policy(path, embedder=model, cache_dir=False), r)
        specs = [ConceptSpec(c.id, c.text, c.nominal_scale) for c in snapshot.concepts]
        t_plan, plan = _time(lambda: compile_plan(pipe, specs, StepWindow(*snapshot.policy.inhibit_steps)), r)
        fresh = cache_rows(path)

    rows = [
        ("policy file", f"{len(raw) / 1024:.0f} KiB, {args.concepts} concepts, {len(candidates)} texts"),
        ("load embedding model (once per process)", f"{load_model:.3f} s"),
        ("parse YAML (safe, with line table)", f"{t_yaml:.3f} s"),
        ("validate (pydantic)", f"{t_validate:.3f} s"),
        ("read file + parse + validate + includes", f"{t_read:.3f} s"),
        ("expand aliases + content hash", f"{t_expand + t_hash:.3f} s"),
        ("embed all texts (MiniLM, batched, no cache)", f"{t_embed:.3f} s"),
        ("distances + complete linkage (embeddings cached)", f"{t_link:.3f} s"),
        ("load_policy total, embeddings not cached", f"{t_cold:.3f} s"),
        ("load_policy total, embeddings cached (a reload)", f"{t_warm:.3f} s"),
        *fresh,
        ("compile plan on the shapes pipeline (encode every concept)", f"{t_plan:.3f} s"),
        ("policy to plan, embeddings not cached", f"{t_cold + t_plan:.3f} s"),
        ("policy to plan, embeddings cached", f"{t_warm + t_plan:.3f} s"),
        ("result", f"{len(kept)} concepts kept, {len(merges)} merges, {len(candidates) - len(kept)} texts folded"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'stage':<{width}}  median of {r}")
    print("-" * (width + 2 + 30))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
