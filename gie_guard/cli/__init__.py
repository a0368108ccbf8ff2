"""The ``gie-guard`` command.

    gie-guard policy check FILE... [--steps N]  validate policies (exit 1 and file:line: problem
                                                per error; a warning for step windows narrower
                                                than one step at N steps)
    gie-guard policy explain FILE_OR_NAME       what a policy does after includes and deduplication
    gie-guard demo [--prompt ...]               one prompt unguarded and guarded, side by side
    gie-guard explain --prompt ...              a concept's attention maps over the steps, as a PNG
    gie-guard adapter train|inspect ...         scale adapters (``scale: auto``)

One module per command group (``policy``, ``demo``, ``explain``, ``adapter``), each with a
``register(commands)`` function; ``pipelines`` loads the model for demo, explain and adapter.
Handlers take the parsed arguments and return the exit status.

:func:`main` is the one error handler: every error of every command becomes one
``error: ...`` line on stderr and exit status 1 (a policy problem keeps its
``file:line: place: problem`` form), Ctrl-C exits with 130, usage errors with 2, and no
traceback is printed unless ``--traceback`` is given. Importing this package, and running
``policy check``, imports neither torch nor diffusers nor transformers.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from . import adapter, demo, evaluate, explain, policy, serve

__all__ = ["build_parser", "format_error", "main"]

Handler = Callable[[argparse.Namespace], int]

# Command groups, in the order `gie-guard --help` lists them.
COMMANDS = (policy, demo, explain, adapter, evaluate, serve)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        code: int = args.handler(args)
        return code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print(f"error: {format_error(exc)}", file=sys.stderr)
        if args.traceback:
            traceback.print_exc()
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gie-guard",
        description="Keep unwanted concepts out of text-to-image generations, driven by YAML policies.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--traceback", action="store_true", help="print the traceback of an error (for bug reports)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMANDS:
        group.register(commands)
    return parser


def format_error(exc: BaseException) -> str:
    """One line for ``exc``: a policy problem as ``file:line: place: problem``, a gie_guard
    error as its message, a file error as ``problem: file``, anything else with its type."""
    from ..errors import GuardError, PolicyError

    if isinstance(exc, PolicyError):
        text = exc.format(column=False)
        more = len(getattr(exc, "problems", ())) - 1
        if more > 0:
            text += f" (and {more} more: gie-guard policy check {exc.file or 'FILE'} lists them all)"
    elif isinstance(exc, GuardError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename is not None else exc.strerror
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gie-guard")
    except PackageNotFoundError:
        return "(source checkout)"
