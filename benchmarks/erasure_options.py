"""Engine options on one shapes-world model, side by side: what competes with a concept in
its attention map (``--sink``: image keys or the prompt's whole joint softmax) and how a
joint-attention family carries the concept's tokens (``--text-states``: ride-along, updated
by every block's text stream, or static, the text encoder's states in every block).

One process, one set of unguarded images shared by every option (benchmarks/erasure.py runs
one option per process and regenerates them). Measures, per option and target, with
erasure.py's Bench (same prompts, seeds, detector and definitions):

- removal on the target's words: pooled over the word and its synonyms, and separately over
  its held-out synonyms (share of images whose prompted attribute is gone, among the seeds
  whose unguarded image has it);
- collateral on other words: the same removal, pooled over the other attributes' words of
  the target's kind (held-out words left out);
- attributes kept / any attribute changed on prompts that do not name the target (all kinds),
  beside the null concept 'zqxv' erased with the same option, scale and window.

    python benchmarks/erasure_options.py --backbone dit --targets circle,red --seeds 0:6 --scale 1.5 \\
        --options image/ride-along,prompt/ride-along,image/static --out DIR

Writes DIR/results.md and DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch  # noqa: E402

import erasure as E  # noqa: E402  (benchmarks/erasure.py)
from _common import write_results  # noqa: E402


def method(texts: list[str], scale: float, window: tuple[float, float], sink: str, text_states: str,
           concept_map: str = "gie") -> str:
    engine = {"sink": sink, "text_states": text_states, "concept_map": concept_map}
    return "gie:" + json.dumps({"texts": texts, "scale": scale, "window": list(window), "engine": engine})


def pooled(removal: dict) -> tuple[float, int]:
    total = sum(n for _, n in removal.values())
    rate = sum(r * n for r, n in removal.values() if n) / total if total else float("nan")
    return rate, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dit", choices=("unet", "dit"))
    parser.add_argument("--targets", default="circle,red")
    parser.add_argument("--seeds", default="0:6", help="START:END seeds per prompted word")
    parser.add_argument("--scale", type=float, default=None, help="GIE scale (required unless --smoke)")
    parser.add_argument("--window", default="0,1")
    parser.add_argument("--options", default="image/ride-along,prompt/ride-along,image/static",
                        help="comma-separated SINK/TEXT_STATES[/MAP] options (MAP: gie, calibrated, gated, output)")
    parser.add_argument("--no-null", action="store_true", help="skip the null-concept rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="circle, one seed, 4 steps, two options: seconds (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        E.STEPS = 4
        args.targets, args.seeds, args.scale, args.options = "circle", "0:1", 2.0, "image/ride-along,prompt/ride-along"
    if args.scale is None:
        parser.error("--scale is required")
    torch.set_num_threads(args.threads)
    start, end = (int(x) for x in args.seeds.split(":"))
    window = tuple(float(x) for x in args.window.split(","))
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    options = [(*o.split("/"), "gie")[:3] for o in args.options.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    bench = E.Bench(range(start, end), args.out, args.backbone)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    rows: list[dict] = []
    for target in targets:
        cols = E.columns_for(E.kind_of(target))
        own = [c for c in cols if c.attribute == target and not c.held_out]
        held = [c for c in cols if c.attribute == target and c.held_out]
        other = [c for c in cols if c.attribute != target and not c.held_out]
        others = [c for k in E.KINDS for c in E.columns_for(k) if not c.held_out and c.attribute != target]
        for sink, states, concept_map in options:
            m = method([target], args.scale, window, sink, states, concept_map)
            removal = bench.removal(m, own + held + other)
            r_own, n_own = pooled({c: removal[c] for c in own})
            r_held, n_held = pooled({c: removal[c] for c in held})
            r_other, n_other = pooled({c: removal[c] for c in other})
            worst = max(((removal[c][0], c.word) for c in other if removal[c][1]), default=(float("nan"), "-"))
            kept, changed, fd = bench.preservation(m, others, {target})
            row = dict(target=target, sink=sink, text_states=states, concept_map=concept_map, scale=args.scale, window=list(window),
                       removal_target=r_own, n_target=n_own, removal_held_out=r_held, n_held_out=n_held,
                       collateral_other=r_other, n_other=n_other, worst_other=worst[0], worst_other_word=worst[1],
                       kept=kept, changed=changed, frechet=fd,
                       per_word={c.word + ("*" if c.held_out else ""): removal[c] for c in own + held + other})
            if not args.no_null:
                null_kept, null_changed, null_fd = bench.preservation(
                    method([E.NULL_CONCEPT], args.scale, window, sink, states, concept_map), others, {target})
                row.update(null_kept=null_kept, null_changed=null_changed, null_frechet=null_fd)
            rows.append(row)
            log(f"{target} sink={sink} text_states={states} map={concept_map}: removal {r_own:.2f} held-out {r_held:.2f} "
                f"collateral {r_other:.2f} kept {kept:.3f}" + ("" if args.no_null else f" (null {row['null_kept']:.3f})"))

    wall = (time.perf_counter() - t0) / 60
    md = [f"# Engine options on the shapes-world model ({args.backbone})\n",
          f"seeds {start}:{end} per prompted word, scale {args.scale:g}, window {window[0]:g}-{window[1]:g}, "
          f"{E.STEPS} steps, guidance {E.GUIDANCE}; command: `python benchmarks/erasure_options.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`; wall {wall:.1f} min, {time.strftime('%Y-%m-%d')}\n",
          "removal = share of images whose prompted attribute is gone (among seeds whose unguarded image has it); "
          "collateral = the same on the other words of the target's kind (worst word in brackets); kept / changed = "
          "attributes kept / images with any attribute changed on prompts not naming the target, all kinds; null = "
          f"the meaningless concept {E.NULL_CONCEPT!r} with the same option.\n",
          "| target | sink | text states | map | removal (word, synonyms) | removal (held-out) | collateral (other words) "
          "| attributes kept | null kept | any changed | null changed |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['target']} | {r['sink']} | {r['text_states']} | {r['concept_map']} | {r['removal_target']:.2f} (n={r['n_target']}) | "
                  f"{r['removal_held_out']:.2f} (n={r['n_held_out']}) | {r['collateral_other']:.2f} "
                  f"({r['worst_other_word']} {r['worst_other']:.2f}) | {r['kept']:.3f} | {r.get('null_kept', float('nan')):.3f} | "
                  f"{r['changed']:.3f} | {r.get('null_changed', float('nan')):.3f} |")
    write_results(args.out, rows, md)
    log(f"wrote {args.out}/results.md, results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
