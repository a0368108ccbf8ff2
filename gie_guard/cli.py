"""The ``gie-guard`` command.

    gie-guard policy check FILE...        validate policies (exit 1 and file:line: message on errors)
    gie-guard policy explain FILE_OR_NAME what a policy does after includes and deduplication
    gie-guard demo [--prompt ...]         generate one image unguarded and guarded, side by side
    gie-guard explain --prompt ...        a concept's attention maps over the steps, as a PNG

Each command group registers itself from ``_COMMANDS``; a new group (``adapter ...``) is one
more ``_add_*`` function. Handlers take the parsed arguments and return the exit status.
Policy problems are printed as ``file:line: place: problem``, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import GuardError, PolicyError

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return int(exc.code or 0)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gie-guard",
        description="Keep unwanted concepts out of text-to-image generations, driven by YAML policies.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _COMMANDS:
        register(commands)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gie-guard")
    except PackageNotFoundError:
        return "(source checkout)"


# -- policy ------------------------------------------------------------------------------


def _add_policy(commands: argparse._SubParsersAction) -> None:
    policy = commands.add_parser("policy", help="check and explain policy files")
    sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)

    check = sub.add_parser("check", help="validate policy files; exit 1 if any is invalid")
    check.add_argument("files", nargs="+", metavar="FILE", help="policy files (.yaml) or shipped policy names")
    check.set_defaults(handler=_policy_check)

    explain = sub.add_parser("explain", help="show a policy after includes and deduplication")
    explain.add_argument("source", metavar="FILE_OR_NAME", help="a policy file or a shipped policy name")
    explain.set_defaults(handler=_policy_explain)


def format_problem(error: PolicyError) -> str:
    """``file:line: place: problem`` (the line is left out when unknown)."""
    where = error.file or "<policy>"
    if error.line is not None:
        where += f":{error.line}"
    place = f"{error.place}: " if error.place else ""
    return f"{where}: {place}{error.problem}"


def _policy_check(args: argparse.Namespace) -> int:
    from .policy import PolicyValidationError, read_policy

    failed = False
    for name in args.files:
        problems: list[PolicyError] = []
        try:
            policy = read_policy(name).policy
        except PolicyValidationError as exc:
            problems = list(exc.problems)
        except PolicyError as exc:
            problems = [exc]
        except Exception as exc:  # a checker reports; it never dies with a traceback
            problems = [PolicyError(f"cannot check this file: {type(exc).__name__}: {exc}", file=name)]
        else:
            enabled = sum(c.enabled for c in policy.concepts)
            print(f"{name}: ok (policy {policy.name!r}, {len(policy.concepts)} concepts, {enabled} enabled)")
        for problem in problems:
            print(format_problem(problem), file=sys.stderr)
        failed = failed or bool(problems)
    return 1 if failed else 0


def _policy_explain(args: argparse.Namespace) -> int:
    from .policy import expand_concepts, load_policy

    try:
        snapshot = load_policy(args.source)
    except GuardError as exc:
        print(format_problem(exc) if isinstance(exc, PolicyError) else str(exc), file=sys.stderr)
        return 1
    policy = snapshot.policy
    candidates = expand_concepts(policy)
    texts = {c.id: c.text for c in candidates}
    start, end = policy.inhibit_steps
    lines = [
        f"policy {policy.name!r} from {snapshot.source or '<object>'}",
        f"  {policy.description}" if policy.description else None,
        f"  files: {', '.join(snapshot.files)}" if snapshot.files else None,
        f"  content hash: {snapshot.content_hash}",
        f"  inhibits during steps {start:.0%}-{end:.0%} of the denoising schedule",
        f"  deduplication: cosine distance < {policy.dedup_threshold:g}" + (" (off)" if policy.dedup_threshold <= 0 else ""),
        f"  when no scale adapter fits the pipeline: {policy.on_missing_adapter}",
        "",
        f"concepts ({len(snapshot.concepts)} after deduplication of {len(candidates)}):",
    ]
    rows = [("id", "text", "category", "scale", "scale comes from")]
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
    print("\n".join(line for line in lines if line is not None))
    return 0


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in rows]


# -- demo --------------------------------------------------------------------------------


def _add_demo(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="generate one prompt unguarded and guarded, side by side")
    demo.add_argument("--prompt", default="a red circle", help="the prompt to generate (default: a red circle)")
    demo.add_argument("--policy", default="shapes-demo", help="policy file or shipped name (default: shapes-demo)")
    demo.add_argument("--out", default="gie-guard-demo.png", help="where to write the PNG (default: gie-guard-demo.png)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from . import demo  # torch and diffusers load only when a demo actually runs

    return demo.main(args)


# -- explain -----------------------------------------------------------------------------


def _add_explain(commands: argparse._SubParsersAction) -> None:
    explain = commands.add_parser("explain", help="draw a concept's attention maps over the steps, unguarded and guarded")
    explain.add_argument("--prompt", required=True, help="the prompt to generate")
    explain.add_argument("--policy", default="shapes-demo", help="policy file or shipped name (default: shapes-demo)")
    explain.add_argument("--concept", help="concept id to draw (default: the policy's first)")
    explain.add_argument("--out", default="gie-guard-explain.png", help="where to write the PNG")
    explain.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    explain.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    explain.add_argument("--columns", type=int, default=8, help="steps shown (default: 8)")
    explain.add_argument("--pipeline", choices=("auto", "shapes", "tiny"), default="auto",
                         help="model: the shapes world, the tiny random one, or shapes when its weights exist")
    explain.add_argument("--weights", help="folder of shapes-world weights (default: the packaged ones)")
    explain.set_defaults(handler=_explain)


def _explain(args: argparse.Namespace) -> int:
    from . import explain  # torch and diffusers load only when it actually runs

    try:
        return explain.main(args)
    except GuardError as exc:
        print(format_problem(exc) if isinstance(exc, PolicyError) else str(exc), file=sys.stderr)
        return 1


def _add_adapter(commands: argparse._SubParsersAction) -> None:
    from .adapters.commands import add_adapter_commands  # `adapter train` / `adapter inspect`

    add_adapter_commands(commands)


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_policy, _add_demo, _add_explain, _add_adapter]


if __name__ == "__main__":
    sys.exit(main())
