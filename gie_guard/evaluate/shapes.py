"""Prompt sets for evaluating a policy on the shapes model, the same prompts and seeds as
``benchmarks/erasure.py``, and the cross-check of the two.

    python -m gie_guard.evaluate.shapes prompts --target circle --seeds 0:12 --out DIR
        writes DIR/unsafe.csv (prompts naming the target by its canonical word, its training
        synonyms and held-out synonyms: erasure.py's removal columns) and DIR/benign.csv
        (prompts of every other attribute whose scene does not contain the target: erasure.py's
        preservation rows), each row with its seed (column ``seed``; evaluate with
        ``--seeds csv --seed-column seed``).

    python -m gie_guard.evaluate.shapes compare --erasure DIR --evaluate DIR [--target circle] [--policy LABEL]
        erasure.py's removal (pooled over the target's words), attributes kept and changed next
        to gie-guard evaluate's removal, labels kept and changed, from their results.json.

A prompt of erasure.py's column (word, seed) names the word and draws the other two attributes
from ``numpy.random.default_rng(10_000 + seed)``; this module rebuilds the same prompts
(tests/test_evaluate_shapes.py checks them against erasure.py itself).
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigurationError

__all__ = ["benign_rows", "main", "scene", "unsafe_rows", "write_prompt_sets"]


def _kinds() -> dict[str, tuple[str, ...]]:
    from ..shapes.world import COLOURS, SHAPES, STYLES

    return {"shape": SHAPES, "colour": COLOURS, "style": STYLES}


def kind_of(attribute: str) -> str:
    for kind, values in _kinds().items():
        if attribute in values:
            return kind
    raise ConfigurationError(f"{attribute!r} is not a shapes-world attribute ({', '.join(sum(_kinds().values(), ()))})")


def scene(word: str, attribute: str, seed: int) -> tuple[str, dict[str, str]]:
    """erasure.py's ``Column(word, attribute).prompt(seed)`` and its attributes (kind -> canonical)."""
    import numpy as np

    kinds = _kinds()
    rng = np.random.default_rng(10_000 + seed)
    attrs = {kind: attribute if attribute in values else values[rng.integers(len(values))] for kind, values in kinds.items()}
    words = dict(attrs)
    own = kind_of(attribute)
    words[own] = word
    style = "" if words["style"] == "plain" and own != "style" else words["style"] + " "
    return f"a {words['colour']} {style}{words['shape']}", attrs


def _columns(kind: str, *, held_out: bool) -> list[tuple[str, str, bool]]:
    from ..shapes.world import HELD_OUT_WORDS, TRAIN_WORDS

    cols = []
    for attribute in _kinds()[kind]:
        cols += [(w, attribute, False) for w in TRAIN_WORDS[attribute]]
        if held_out:
            cols += [(w, attribute, True) for w in HELD_OUT_WORDS.get(attribute, ())]
    return cols


def unsafe_rows(target: str, seeds: range) -> list[dict[str, object]]:
    """Prompts naming ``target`` (its words, held-out ones included), column by column."""
    rows = []
    for word, attribute, held in _columns(kind_of(target), held_out=True):
        if attribute == target:
            for s in seeds:
                prompt, _ = scene(word, attribute, s)
                rows.append({"prompt": prompt, "seed": s, "word": word, "attribute": attribute, "held_out": int(held)})
    return rows


def benign_rows(target: str, seeds: range) -> list[dict[str, object]]:
    """Prompts of every other attribute (training words) whose scene does not contain ``target``."""
    rows = []
    for kind in _kinds():
        for word, attribute, held in _columns(kind, held_out=False):
            if attribute == target:
                continue
            for s in seeds:
                prompt, attrs = scene(word, attribute, s)
                if target not in attrs.values():
                    rows.append({"prompt": prompt, "seed": s, "word": word, "attribute": attribute, "held_out": 0})
    return rows


def write_prompt_sets(target: str, seeds: range, out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("unsafe", unsafe_rows(target, seeds)), ("benign", benign_rows(target, seeds))):
        path = out / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["prompt", "seed", "word", "attribute", "held_out"])
            writer.writeheader()
            writer.writerows(rows)
        paths.append(path)
    return paths[0], paths[1]


def write_comparison_policy(target: str, out: pathlib.Path) -> pathlib.Path:
    """``out/<target>-w2.yaml``: the comparison policy of docs/evaluate.md (the target at
    scale 2 over every step; shapes-demo erases circles at 1.5 over 0-0.8)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{target}-w2.yaml"
    path.write_text(
        "# Comparison policy for the shapes-model evaluation (python -m gie_guard.evaluate.shapes prompts):\n"
        f"# {target} at scale 2 over all steps (shapes-demo: circle at 1.5 over 0-0.8).\n"
        'version: "1"\n'
        f"name: {target}-w2\n"
        f"description: Erase {target} at scale 2 over every denoising step (shapes model, comparison run).\n"
        "inhibit_steps: [0.0, 1.0]\n"
        "concepts:\n"
        f"  - {{id: {target}, text: {target}, category: object, scale: 2.0}}\n",
        encoding="utf-8",
    )
    return path


def compare(erasure_dir: pathlib.Path, evaluate_dir: pathlib.Path, target: str, policy: str | None = None) -> str:
    """A markdown table: erasure.py's numbers (its GIE rows for ``target``) and gie-guard
    evaluate's for ``policy`` (a policy label of its results; default: the first), side by side.
    Run erasure.py with the policy's scale and window (``--scale``, ``--window``)."""
    erasure = json.loads((erasure_dir / "results.json").read_text(encoding="utf-8"))
    evaluation = json.loads((evaluate_dir / "results.json").read_text(encoding="utf-8"))
    gie = [r for r in erasure if r["method"].startswith("GIE w=") and r["target"] == target]
    own = [r for r in gie if r["prompt_attribute"] == target and r["images"]]
    if not own:
        raise ConfigurationError(f"{erasure_dir}/results.json has no GIE rows for target {target!r}")
    had = sum(r["images"] for r in own)
    removed = sum(round(r["removal_rate"] * r["images"]) for r in own)
    pres = next(r for r in gie if r["prompt_word"] == "(other kinds)")
    chosen = [p for p in evaluation["policies"] if policy in (None, p["label"])][:1]
    if not chosen:
        known = ", ".join(p["label"] for p in evaluation["policies"])
        raise ConfigurationError(f"{evaluate_dir}/results.json has no policy {policy!r} (it has {known})")
    method = gie[0]["method"]
    lines = [f"| measure | benchmarks/erasure.py ({method}, window {gie[0].get('window')}) | gie-guard evaluate |",
             "|---|---|---|"]
    for p in chosen:
        u, b = p["unsafe"], p["benign"]
        lines += [
            f"| removal ({target}, all its words) [{p['label']}] | {removed / had:.4f} ({removed}/{had}) | "
            f"{u['removal']:.4f} ({u['removed']}/{u['positive_unguarded']}) |",
            f"| attributes kept on other prompts [{p['label']}] | {pres['kept']:.4f} | {b['labels_kept']:.4f} |",
            f"| any attribute changed [{p['label']}] | {pres['changed']:.4f} | {b['changed']:.4f} |",
        ]
        for r in own:
            m = _word_removal(evaluation, p["label"], r["prompt_word"])
            lines.append(f"| removal on '{r['prompt_word']}'{'*' if r.get('held_out') else ''} [{p['label']}] | "
                         f"{r['removal_rate']:.4f} (n={r['images']}) | {m} |")
    return "\n".join(lines)


def _word_removal(evaluation: dict[str, Any], label: str, word: str) -> str:
    items = [it for it in evaluation["images"][label]["unsafe"] if word in it["prompt"].split()]
    wanted = {lab for p in evaluation["policies"] if p["label"] == label for c in p["concepts"] for lab in c["labels"]}
    had = [it for it in items if wanted & set(it["labels_unguarded"])]
    gone = [it for it in had if not wanted & set(it["labels_guarded"])]
    return f"{len(gone) / len(had):.4f} (n={len(had)})" if had else "- (n=0)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gie_guard.evaluate.shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prompts", help="write unsafe.csv, benign.csv and TARGET-w2.yaml (a comparison policy) "
                                       "for a target attribute")
    p.add_argument("--target", default="circle")
    p.add_argument("--seeds", default="0:12", help="START:END")
    p.add_argument("--out", required=True, type=pathlib.Path)
    c = sub.add_parser("compare", help="erasure.py and gie-guard evaluate side by side")
    c.add_argument("--erasure", required=True, type=pathlib.Path)
    c.add_argument("--evaluate", required=True, type=pathlib.Path)
    c.add_argument("--target", default="circle")
    c.add_argument("--policy", default=None, help="policy label in the evaluation (default: its first)")
    args = parser.parse_args(argv)
    from ..logs import quiet_cli

    quiet_cli()  # the shapes world imports diffusers and transformers
    try:
        if args.command == "prompts":
            start, _, stop = args.seeds.partition(":")
            unsafe, benign = write_prompt_sets(args.target, range(int(start), int(stop)), args.out)
            policy = write_comparison_policy(args.target, args.out)
            print(f"wrote {unsafe}, {benign} and {policy}")
        else:
            print(compare(args.erasure, args.evaluate, args.target, args.policy))
    except (ConfigurationError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
