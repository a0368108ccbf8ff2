"""How long a large policy takes to load, validate and deduplicate.

    HF_HUB_OFFLINE=1 python benchmarks/compile_policy.py [--concepts 1000] [--repeat 3]

The policy is generated from the real prompt sets in ../shared/data/ (read at run time):
object classes, artist names and frequent caption phrases, with a mix of fixed and auto
scales and an alias on every tenth concept. ``build_large_policy(n)`` is reusable (the plan
compilation benchmark extends this one).
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
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


def _phrases() -> Iterator[tuple[str, str]]:
    """(text, category) in order of preference: object classes, artists, caption phrases."""
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a shared 2-core machine)")
    args = parser.parse_args(argv)
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
                                                           embedder=model), r)
        t_cold, _ = _time(lambda: load_policy(path, embedder=SentenceTransformerEmbedder()), r)
        t_warm, snapshot = _time(lambda: load_policy(path, embedder=model), r)
        specs = [ConceptSpec(c.id, c.text, c.nominal_scale) for c in snapshot.concepts]
        t_plan, plan = _time(lambda: compile_plan(pipe, specs, StepWindow(*snapshot.policy.inhibit_steps)), r)

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
