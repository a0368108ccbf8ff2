"""``gie-guard policy check|explain|labels``: validate and explain policy files, and map the
opaque concept labels of the image service back to concept ids, without torch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import ConfigurationError, PolicyError

if TYPE_CHECKING:
    from ..policy import FlatPolicy, PolicySnapshot

__all__ = ["register", "window_warning"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = commands.add_parser("policy", help="check and explain policy files")
    sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)

    check = sub.add_parser("check", help="validate policy files; exit 1 if any is invalid")
    check.add_argument("files", nargs="+", metavar="FILE", help="policy files (.yaml) or shipped policy names")
    check.add_argument("--steps", type=int, default=20,
                       help="warn about step windows narrower than one step at this many steps (default: 20)")
    check.add_argument("--root", action="append", default=[], metavar="DIR",
                       help="an extra folder includes may resolve into (repeatable; default: the policy's own folder)")
    check.set_defaults(handler=_check)

    explain = sub.add_parser("explain", help="show a policy after includes and deduplication")
    explain.add_argument("source", metavar="FILE_OR_NAME", help="a policy file or a shipped policy name")
    explain.add_argument("--steps", type=int, default=20, help="show the inhibited steps at this many steps (default: 20)")
    explain.add_argument("--root", action="append", default=[], metavar="DIR",
                         help="an extra folder includes may resolve into (repeatable)")
    explain.add_argument("--suggest-anchors", action="store_true",
                         help="list each concept's nearest neighbours (embedder space) that the policy does not erase: "
                              "candidates for preserve:")
    explain.add_argument("--vocabulary", action="append", default=[], metavar="FILE",
                         help="extra candidate anchors, one per line (repeatable; added to the shipped vocabulary)")
    explain.add_argument("--no-shipped-vocabulary", action="store_true", help="use only the --vocabulary files")
    explain.add_argument("--top", type=int, default=5, help="suggestions per concept (default: 5)")
    explain.set_defaults(handler=_explain)

    labels = sub.add_parser("labels", help="the image service's opaque concept labels and the concept ids they stand for")
    labels.add_argument("source", metavar="FILE_OR_NAME", help="a policy file or a shipped policy name")
    labels.add_argument("--key-env", metavar="VAR",
                        help="environment variable holding the service's concept_label_key (default: no key)")
    labels.add_argument("--root", action="append", default=[], metavar="DIR",
                        help="an extra folder includes may resolve into (repeatable)")
    labels.set_defaults(handler=_labels)


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ConfigurationError(f"--steps must be at least 1, got {steps}")


def _check(args: argparse.Namespace) -> int:
    from ..policy import PolicyValidationError, read_policy

    _check_steps(args.steps)
    failed = False
    for name in args.files:
        problems: list[PolicyError] = []
        try:
            flat = read_policy(name, roots=args.root)
        except PolicyValidationError as exc:
            problems = list(exc.problems)
        except PolicyError as exc:
            problems = [exc]
        except Exception as exc:  # a checker reports every file; it never stops at one
            problems = [PolicyError(f"cannot check this file: {type(exc).__name__}: {exc}", file=name)]
        else:
            policy = flat.policy
            enabled = sum(c.enabled for c in policy.concepts)
            print(f"{name}: ok (policy {policy.name!r}, {len(policy.concepts)} concepts, {enabled} enabled)")
            warning = window_warning(policy.inhibit_steps, args.steps)
            if warning:
                print(f"{_where(flat, name)}: warning: {warning}", file=sys.stderr)
        for problem in problems:
            print(problem.format(column=False), file=sys.stderr)
        failed = failed or bool(problems)
    return 1 if failed else 0


def window_warning(inhibit_steps: Sequence[float], steps: int) -> str | None:
    """A warning when an ``inhibit_steps`` window is narrower than one step at ``steps``
    steps, saying which step it inhibits (``gie_guard.window``'s widening rule)."""
    from ..window import StepWindow

    start, end = (float(x) for x in inhibit_steps)
    window = StepWindow(start, end)
    if (end - start) * steps >= 1:
        return None
    (step,) = window.steps(steps)
    span = f"inhibit_steps [{start:g}, {end:g}] is narrower than one step at {steps} steps"
    if window.widened(steps):
        return f"{span} and covers none; the widening rule inhibits step {step} only (of 0-{steps - 1})"
    return f"{span}; it inhibits step {step} only (of 0-{steps - 1})"


def _where(flat: FlatPolicy, name: str) -> str:
    """``name:line`` of the top file's ``inhibit_steps`` key, or ``name`` when unknown."""
    if not flat.files:
        return name
    try:
        from ..policy.yamlio import parse_policy_bytes, read_policy_file

        doc = parse_policy_bytes(read_policy_file(flat.files[0]), file=name)
        line, _ = doc.where(("inhibit_steps",), key=True)
    except Exception:  # only the position is lost
        return name
    return f"{name}:{line}" if line is not None and "inhibit_steps" in (doc.data or {}) else name


def _explain(args: argparse.Namespace) -> int:
    from ..policy import expand_concepts, load_policy
    from ..window import StepWindow

    _check_steps(args.steps)
    snapshot = load_policy(args.source, roots=args.root)
    policy = snapshot.policy
    candidates = expand_concepts(policy)
    texts = {c.id: c.text for c in candidates}
    start, end = policy.inhibit_steps
    inhibited = StepWindow(float(start), float(end)).steps(args.steps)
    lines = [
        f"policy {policy.name!r} from {snapshot.source or '<object>'}",
        f"  {policy.description}" if policy.description else None,
        f"  files: {', '.join(snapshot.files)}" if snapshot.files else None,
        f"  content hash: {snapshot.content_hash}",
        f"  inhibits during steps {start:.0%}-{end:.0%} of the denoising schedule "
        f"(at {args.steps} steps: {_ranges(inhibited)})",
        f"  deduplication: cosine distance < {policy.dedup_threshold:g}" + (" (off)" if policy.dedup_threshold <= 0 else ""),
        f"  when no scale adapter fits the pipeline: {policy.on_missing_adapter}",
        "",
        f"concepts ({len(snapshot.concepts)} after deduplication of {len(candidates)}):",
    ]
    rows: list[tuple[str, ...]] = [("id", "text", "category", "scale", "scale comes from")]
    for c in snapshot.concepts:
        if c.scale is not None:
            scale, source = f"{c.scale:g}", "fixed in the policy"
        else:
            assert c.auto is not None
            scale = "auto"
            source = f"adapter, clamped to [{c.auto.min:g}, {c.auto.max:g}]; {c.auto.fallback:g} without one"
        alias = f", alias of {c.origin}" if c.is_alias else ""
        rows.append((c.id, c.text, c.category, scale, f"{source} ({c.declared_at or 'object'}{alias})"))
    lines += _table(rows)
    lines.append("")
    if snapshot.merges:
        lines.append("merged (kept <- dropped, largest distance in the group):")
        for m in snapshot.merges:
            dropped = ", ".join(f"{i} ({texts[i]!r})" for i in m.merged_ids)
            lines.append(f"  {m.kept_id} ({texts[m.kept_id]!r}) <- {dropped}   {m.distance:.3f}")
    else:
        lines.append("merged: none")
    disabled = [c.id for c in policy.concepts if not c.enabled]
    if disabled:
        lines.append(f"disabled: {', '.join(disabled)}")
    lines += _precision_lines(snapshot)
    if args.suggest_anchors:
        lines += _suggestion_lines(snapshot, args)
    print("\n".join(line for line in lines if line is not None))
    warning = window_warning(policy.inhibit_steps, args.steps)
    if warning:
        print(f"{args.source}: warning: {warning}", file=sys.stderr)
    for warning in snapshot.warnings:
        print(f"{args.source}: warning: {warning}", file=sys.stderr)
    return 0


def _precision_lines(snapshot: PolicySnapshot) -> list[str]:
    """Preservation anchors and presence gating, per concept (docs/precision.md)."""
    anchored = [c for c in snapshot.concepts if c.anchors]
    lines = ["", f"preservation anchors (preserve_by: {_mechanism(snapshot.policy.preserve_by)}):" if anchored else "preservation anchors: none"]
    lines += [f"  {c.id}: {', '.join(repr(a) for a in c.anchors)}" for c in anchored]
    gated = [c for c in snapshot.concepts if c.presence.mode != "off"]
    lines.append("presence gating:" if gated else "presence gating: off")
    lines += [f"  {c.id}: {c.presence.mode} at presence >= {c.presence.threshold:g}" for c in gated]
    return lines


def _mechanism(preserve_by: str) -> str:
    return "auto: project on SD3/Flux, compete on UNet/PixArt/Sana" if preserve_by == "auto" else preserve_by


def _suggestion_lines(snapshot: PolicySnapshot, args: argparse.Namespace) -> list[str]:
    from ..policy.anchors import suggest_anchors, vocabulary_of

    if args.top < 1:
        raise ConfigurationError(f"--top must be at least 1, got {args.top}")
    vocabulary = vocabulary_of(args.vocabulary, shipped=not args.no_shipped_vocabulary)
    found = suggest_anchors(snapshot, vocabulary, per_concept=args.top)
    lines = [
        "",
        f"suggested anchors (nearest of {len(vocabulary)} vocabulary entries the policy does not erase, cosine "
        f"distance; entries closer than dedup_threshold {snapshot.policy.dedup_threshold:g} are synonyms and left out):",
    ]
    for concept_id, picks in found.items():
        listed = ", ".join(f"{p.text} ({p.distance:.3f})" for p in picks) or "none"
        lines.append(f"  {concept_id}: {listed}")
    lines.append("copy the ones to keep into the concept's preserve: list")
    return lines


def _ranges(steps: tuple[int, ...]) -> str:
    """``0-15`` for consecutive steps, ``4`` for one, ``none`` for none."""
    if not steps:
        return "none"
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def _labels(args: argparse.Namespace) -> int:
    """One line per concept id (aliases included): the label clients see, then the id."""
    import os

    from ..policy import read_policy
    from ..policy.snapshot import expand_concepts
    from ..serving.schemas import concept_label

    key = ""
    if args.key_env:
        if args.key_env not in os.environ:
            raise ConfigurationError(f"--key-env: the environment variable {args.key_env} is not set")
        key = os.environ[args.key_env]
    policy = read_policy(args.source, roots=args.root).policy
    for concept in expand_concepts(policy):
        print(f"{concept_label(policy.name, concept.id, key)}  {concept.id}")
    return 0
