"""Report writers of ``gie-guard evaluate``: ``results.json`` (every measure and every image's
labels), ``report.md`` (the tables) and ``report.html`` (the tables and, per policy, the worst
preservation cases, a sample of removals and of residuals, side by side as inline thumbnails:
one self-contained file, no external resources).

Unless ``--show-unsafe`` is given, thumbnails of images the judge finds positive for the
policy are blurred (the verifiers' blur) when the judge is anything but the toy ``shapes``
detector: the report is meant to be opened and shared.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
from typing import Any

import numpy as np

from .measures import fmt

__all__ = ["markdown_report", "write_reports"]


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_reports(config: Any, results: dict[str, Any], store: Any, labels: dict[str, frozenset[str]],
                  guards: dict[str, dict[str, Any]]) -> None:
    pairs = results.pop("_pairs")
    results["images"] = {
        policy: {name: [_image_entry(it, store) for it in items] for name, items in sets.items()}
        for policy, sets in pairs.items()
    }
    _atomic_write(config.out / "results.json", json.dumps(results, indent=1, ensure_ascii=False, default=_json) + "\n")
    _atomic_write(config.out / "report.md", markdown_report(results))
    _atomic_write(config.out / "report.html", html_report(config, results, pairs, store, guards))


def _json(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


def _image_entry(item: dict[str, Any], store: Any) -> dict[str, Any]:
    row = item["row"]
    out = {
        "index": row.index, "line": row.line, "seed": row.seed, "prompt": row.prompt,
        "unguarded": store.records[item["unguarded"]]["file"], "guarded": store.records[item["guarded"]]["file"],
        "labels_unguarded": sorted(item["before"]), "labels_guarded": sorted(item["after"]),
    }
    for key in ("removed", "residual", "ms_ssim"):
        if key in item:
            out[key] = item[key]
    return out


# -- markdown ---------------------------------------------------------------------------------


def _n(rate: Any, k: Any, n: Any) -> str:
    return f"{fmt(rate)} ({k}/{n})" if rate is not None else f"- (0/{n})"


def markdown_report(results: dict[str, Any]) -> str:
    model, settings, sets = results["model"], results["settings"], results["sets"]
    lines = [
        "# gie-guard evaluate",
        "",
        f"`{results['command']}`" if results.get("command") else "",
        "",
        f"- model: {model['description']} (`{model['pipeline_class']}`, family `{model['family']}`, "
        f"{model['device']}, {model['dtype']})",
        f"- judge: `{results['judge']['name']}`; steps {settings['steps']}, guidance {fmt(settings['guidance'], 2)}, "
        f"seeds {settings['seeds']}, batch {settings['batch_size']}",
    ]
    for name, s in sets.items():
        extra = f", where {' and '.join(s['where'])}" if s["where"] else ""
        lines.append(f"- {name} set: `{s['file']}` column `{s['column']}`: {s['prompts']} prompts, "
                     f"{s['images']} images per variant{extra}")
    run = results["run"]
    lines.append(f"- run: {run['generated']} images generated, {run['reused']} reused from an earlier run, "
                 f"{run['wall_seconds']:.0f} s wall; gie-guard {results['version']}, {results['created']}")
    lines += ["", "## Summary", ""]
    has_unsafe = "unsafe" in sets
    has_benign = "benign" in sets
    has_clip = any("clip_score_delta" in p.get("benign", {}) for p in results["policies"])
    head = ["policy", "concepts (scale)"]
    if has_unsafe:
        head += ["removal", "residual guarded", "positive unguarded", "appeared"]
    if has_benign:
        head += ["benign MS-SSIM mean / p10", "benign FP guarded (unguarded)", "labels kept", "changed"]
        if has_clip:
            head += ["CLIP score guarded (unguarded)"]
    head += ["time ratio", "CPU ratio", "added ratio"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in results["policies"]:
        cells = [f"`{p['label']}`", ", ".join(f"{c['id']} ({c['scale']})" for c in p["concepts"])]
        if has_unsafe:
            u = p["unsafe"]
            cells += [_n(u["removal"], u["removed"], u["positive_unguarded"]),
                      _n(u["residual"], u["positive_guarded"], u["images"]),
                      _n(u["unguarded_rate"], u["positive_unguarded"], u["images"]), str(u["appeared"])]
        if has_benign:
            b = p["benign"]
            cells += [f"{fmt(b['ms_ssim_mean'])} / {fmt(b['ms_ssim_p10'])}",
                      f"{fmt(b['false_positive_guarded'])} ({fmt(b['false_positive_unguarded'])})",
                      fmt(b["labels_kept"]), fmt(b["changed"])]
            if has_clip:
                cells += [f"{fmt(b.get('clip_score_guarded'), 2)} ({fmt(b.get('clip_score_unguarded'), 2)})"]
        c = p["cost"]
        cells += [fmt(c["time_ratio"]), fmt(c.get("cpu_ratio")), fmt(c["added_ratio"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "removal: share of unsafe images positive unguarded (judge finds one of the policy's labels) and negative "
        "guarded, same seed; residual: share of all unsafe images positive guarded; appeared: negative unguarded, "
        "positive guarded. MS-SSIM: multi-scale SSIM of each benign image guarded vs unguarded (1 = identical). "
        "FP: benign images the judge finds positive. labels kept: share of the judge's labels on the unguarded "
        "benign image still found guarded. time ratio: median over images of guarded / unguarded wall seconds "
        "(same batches, generated alternately); CPU ratio: the same from process CPU seconds, totals (CPU runs); "
        "added ratio: the guard's own added seconds (its reports) / unguarded seconds.",
    ]
    if has_unsafe:
        for p in results["policies"]:
            per = p["unsafe"]["per_label"]
            if len(per) > 1:
                lines += ["", f"### Per concept label: `{p['label']}` (unsafe set)", "",
                          "| label | concepts | removal | residual guarded | positive unguarded |", "|---|---|---|---|---|"]
                for label, m in per.items():
                    lines.append(f"| {label} | {', '.join(m['concepts'])} | {_n(m['removal'], m['removed'], m['positive_unguarded'])} "
                                 f"| {_n(m['residual'], m['positive_guarded'], m['images'])} "
                                 f"| {_n(m['unguarded_rate'], m['positive_unguarded'], m['images'])} |")
        names = sorted({k for p in results["policies"] for k in p["unsafe"]["label_counts"]})
        if names:
            first = results["policies"][0]["unsafe"]["label_counts"]
            lines += ["", "### Judge labels on the unsafe set (images with the label)", "",
                      "| label | unguarded | " + " | ".join(f"`{p['label']}`" for p in results["policies"]) + " |",
                      "|---|---|" + "---|" * len(results["policies"])]
            for k in names:
                lines.append(f"| {k} | {first.get(k, {}).get('unguarded', 0)} | "
                             + " | ".join(str(p["unsafe"]["label_counts"].get(k, {}).get("guarded", 0))
                                          for p in results["policies"]) + " |")
    lines += ["", "### Cost", "", "| policy | s/image unguarded | s/image guarded | time ratio (median) | time ratio "
              "(totals) | CPU ratio | added s/image | added ratio | steps inhibited |", "|---|---|---|---|---|---|---|---|---|"]
    for p in results["policies"]:
        c = p["cost"]
        lines.append(f"| `{p['label']}` | {fmt(c['seconds_per_image_unguarded'], 4)} | {fmt(c['seconds_per_image_guarded'], 4)} "
                     f"| {fmt(c['time_ratio'])} | {fmt(c.get('time_ratio_total'))} | {fmt(c.get('cpu_ratio'))} "
                     f"| {fmt(c['added_seconds_per_image'], 4)} | {fmt(c['added_ratio'])} "
                     f"| {fmt(c['steps_inhibited_mean'], 1)} |")
    off = [p for p in results["policies"] if p["verifiers_switched_off"]]
    if off:
        lines += ["", "Verifiers named by the policies' `verify:` keys were switched off for the evaluation (the judge "
                  "measures what the inhibition leaves): " + "; ".join(f"`{p['label']}`: {', '.join(p['verifiers_switched_off'])}"
                                                                       for p in off) + "."]
    return "\n".join(lines) + "\n"


# -- html -------------------------------------------------------------------------------------
# templates/report.html.j2 (Jinja2, autoescaped) lays the page out; the markdown report's
# tables become HTML with markdown-it-py (CommonMark and its table extension, raw HTML off).


def _thumb(image: np.ndarray, blur: bool) -> str:
    from PIL import Image

    im = Image.fromarray(image)
    if blur:
        from ..verifiers import blur_image

        im = blur_image(im)
    side = max(im.size)
    if side < 128:
        f = max(1, 128 // side)
        im = im.resize((im.width * f, im.height * f), Image.Resampling.NEAREST)
        buf, mime = io.BytesIO(), "image/png"
        im.save(buf, format="PNG", optimize=True)
    else:
        im.thumbnail((192, 192), Image.Resampling.LANCZOS)
        buf, mime = io.BytesIO(), "image/jpeg"
        im.convert("RGB").save(buf, format="JPEG", quality=85)
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _figure(item: dict[str, Any], store: Any, caption: str, blur_labels: set[str] | None) -> dict[str, Any]:
    """One unguarded/guarded pair for the template's ``figure`` macro."""
    cells = []
    for which, labels in (("unguarded", item["before"]), ("guarded", item["after"])):
        blur = blur_labels is not None and bool(labels & blur_labels)
        title = f"{which}: {', '.join(sorted(labels)) or 'no labels'}" + (" (blurred)" if blur else "")
        cells.append({"src": _thumb(store.image(item[which]), blur), "title": title})
    prompt = item["row"].prompt
    short = prompt if len(prompt) <= 160 else prompt[:157] + "..."
    return {"cells": cells, "prompt": short, "seed": item["row"].seed, "caption": caption}


def _sample(items: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Up to ``k`` items spread evenly over the list (deterministic)."""
    if len(items) <= k:
        return items
    idx = np.linspace(0, len(items) - 1, k).round().astype(int)
    return [items[i] for i in dict.fromkeys(idx.tolist())]


def _markdown_html(md: str) -> str:
    """The markdown report as HTML: CommonMark with tables; raw HTML in it is escaped."""
    from markdown_it import MarkdownIt

    rendered: str = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    return rendered


def html_report(config: Any, results: dict[str, Any], pairs: dict[str, Any], store: Any,
                guards: dict[str, dict[str, Any]]) -> str:
    import jinja2

    k = config.thumbnails
    policies = []
    for policy in results["policies"]:
        label = policy["label"]
        wanted = {lab for c in policy["concepts"] for lab in c["labels"]}
        blur = None if (config.show_unsafe or results["judge"]["name"] == "shapes") else wanted
        sets = pairs[label]
        sections = []
        if "benign" in sets and k:
            worst = sorted(sets["benign"], key=lambda it: it["ms_ssim"])[:k]
            sections.append({
                "title": f"Worst preservation (benign set, lowest MS-SSIM, {len(worst)} of {len(sets['benign'])})",
                "figures": [_figure(it, store, f"MS-SSIM {it['ms_ssim']:.3f}; labels {_labels(it)}", blur) for it in worst],
            })
        if "unsafe" in sets and k:
            removed = [it for it in sets["unsafe"] if it["removed"]]
            residual = [it for it in sets["unsafe"] if it["residual"]]
            shown = _sample(removed, k)
            sections.append({"title": f"Removals (unsafe set, {len(shown)} of {len(removed)})",
                             "figures": [_figure(it, store, f"labels {_labels(it)}", blur) for it in shown]})
            shown = _sample(residual, max(1, k // 2))
            sections.append({"title": f"Residuals (unsafe set, judge positive guarded, {len(shown)} of {len(residual)})",
                             "figures": [_figure(it, store, f"labels {_labels(it)}", blur) for it in shown]})
        policies.append({"label": label, "blurred": blur is not None, "sections": sections})
    environment = jinja2.Environment(loader=jinja2.PackageLoader("gie_guard.evaluate", "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    page: str = environment.get_template("report.html.j2").render(
        tables=_markup(_markdown_html(markdown_report(results))), policies=policies)
    return page


def _markup(text: str) -> Any:
    """``text`` as HTML the template inserts as is (it is rendered by markdown-it, escaped there)."""
    from markupsafe import Markup

    return Markup(text)


def _labels(item: dict[str, Any]) -> str:
    return f"{', '.join(sorted(item['before'])) or '-'} → {', '.join(sorted(item['after'])) or '-'}"
