"""Quiet logs: what gie_guard does to other libraries' logging, and nothing more.

:func:`install_log_filters` (the Guard calls it when it is built; idempotent) does two things
and never touches the root logger:

1. Dependency loggers stay below INFO unless someone configured them: each logger of
   :data:`QUIET_LOGGERS` whose level is still unset (``NOTSET``) gets ``WARNING``, so an
   application's ``logging.basicConfig(level=logging.INFO)`` does not fill its logs with
   watchfiles' "N changes detected" for every policy reload. A level set before (by the user,
   or by diffusers/transformers from ``DIFFUSERS_VERBOSITY``/``TRANSFORMERS_VERBOSITY``) is kept.
2. Records that carry prompt text are demoted below WARNING: diffusers' "The following part
   of your input was truncated because CLIP can only handle sequences up to 77 tokens: <the
   rest of the prompt>", and its T5/``max_sequence_length`` variants (SD3, Flux and others).
   gie_guard promises that no prompt text is logged at INFO or above. The
   :class:`PromptTextFilter` matches exactly those messages; a matching record becomes a
   DEBUG record, and is dropped unless the logger that wrote it is enabled for DEBUG. It
   sits on every diffusers/transformers logger that exists when it is installed (so it
   applies before any handler, also the application's own) and on those libraries' own
   stderr handlers (both stop propagation at their root logger and print through it).

:func:`quiet_cli` is for the ``gie-guard`` command only, which owns its process: library
warnings about the environment (transformers' "CLIPImageProcessor requires torchvision ...")
and download/loading progress bars stay off the user's terminal.

:func:`quiet_loading` is for library use: while one of gie_guard's own loaders runs (the
shapes-world model, the tiny test pipelines, ``--pipeline``/``--model`` loading, evaluate's
models), transformers and diffusers print errors only and no progress bars; their settings
are restored afterwards, so the application's own loading is untouched. An environment that
sets ``TRANSFORMERS_VERBOSITY``, ``DIFFUSERS_VERBOSITY`` or ``HF_HUB_DISABLE_PROGRESS_BARS``
is obeyed instead (that library is left as it is).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["PROMPT_TEXT_PATTERN", "QUIET_LOGGERS", "PromptTextFilter", "install_log_filters", "quiet_cli", "quiet_loading"]

# Dependency loggers that log at INFO in normal operation.
QUIET_LOGGERS = (
    "diffusers",
    "transformers",
    "sentence_transformers",
    "watchfiles",
    "urllib3",
    "httpx",
    "httpcore",
    "huggingface_hub",
    "filelock",
    "PIL",
)

# Loggers whose records may carry prompt text.
PROMPT_LOGGERS = ("diffusers", "transformers")

# diffusers: "The following part of your input was truncated because CLIP|T5|CLAP|Gemma can
# only handle sequences up to N tokens: ...", "... because `max_sequence_length` is set to
# N tokens: ...", and "Your input was truncated because `max_sequence_length` ...".
PROMPT_TEXT_PATTERN = re.compile(r"^(The following part of your input|Your input) was truncated because ")

_LOCK = threading.Lock()


class PromptTextFilter(logging.Filter):
    """Demotes records whose message carries prompt text (:data:`PROMPT_TEXT_PATTERN`) to
    DEBUG; passes them on only where their own logger is enabled for DEBUG. A demoted record
    keeps its original level name in ``record.demoted_from``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not isinstance(record.msg, str):
            return True
        if not PROMPT_TEXT_PATTERN.match(record.msg):
            return True
        record.demoted_from = record.levelname
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_FILTER = PromptTextFilter()


def _add_filter(target: logging.Filterer) -> None:
    if not any(isinstance(f, PromptTextFilter) for f in target.filters):
        target.addFilter(_FILTER)


def install_log_filters() -> None:
    """Quiet the dependency loggers and filter prompt text out of their WARNINGs (see the
    module docstring). Idempotent, and cheap when no logger was created since the last call
    (one length check), so it can run before every guarded call: a pipeline's module, and
    its logger, may be imported after the guard is built."""
    global _seen
    loggers = logging.Logger.manager.loggerDict
    if len(loggers) == _seen:
        return
    with _LOCK:
        if _seen < 0:
            for name in QUIET_LOGGERS:
                logger = logging.getLogger(name)
                if logger.level == logging.NOTSET:
                    logger.setLevel(logging.WARNING)
        prefixes = tuple(f"{p}." for p in PROMPT_LOGGERS)
        for name in PROMPT_LOGGERS:
            root = logging.getLogger(name)
            _add_filter(root)
            for handler in root.handlers:
                _add_filter(handler)
        for name, entry in list(loggers.items()):  # Loggers and PlaceHolders
            if isinstance(entry, logging.Logger) and name.startswith(prefixes):
                _add_filter(entry)
        _seen = len(loggers)


_seen = -1  # len(loggerDict) at the last full pass


def quiet_cli() -> None:
    """For the ``gie-guard`` command: diffusers and transformers print errors only, and no
    progress bars, unless the user's environment says otherwise. Call it before they are
    imported; it also adjusts them if they are. Then :func:`install_log_filters`."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import sys

    for name in ("diffusers", "transformers"):
        if f"{name}.utils.logging" in sys.modules:
            level = os.environ[f"{name.upper()}_VERBOSITY"].upper()
            logging.getLogger(name).setLevel(getattr(logging, level, logging.ERROR))
    install_log_filters()


_LOADING_LOCK = threading.Lock()
_loading_depth = 0
_loading_restore: list[tuple[Any, int, bool]] = []  # (the library's logging module, verbosity, bars on)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Context manager and decorator (``@quiet_loading()``) for gie_guard's own model loaders
    (module docstring): transformers and diffusers at ERROR, no progress bars, restored when
    the last loader that is running (on any thread) is done."""
    global _loading_depth
    with _LOADING_LOCK:
        if _loading_depth == 0:
            for name in ("transformers", "diffusers"):
                if os.environ.get(f"{name.upper()}_VERBOSITY") or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
                    continue
                try:
                    lib = importlib.import_module(f"{name}.utils.logging")
                except ImportError:
                    continue
                _loading_restore.append((lib, lib.get_verbosity(), lib.is_progress_bar_enabled()))
                lib.set_verbosity(logging.ERROR)
                lib.disable_progress_bar()
        _loading_depth += 1
    try:
        yield
    finally:
        with _LOADING_LOCK:
            _loading_depth -= 1
            if _loading_depth == 0:
                while _loading_restore:
                    module, verbosity, bars = _loading_restore.pop()
                    module.set_verbosity(verbosity)
                    if bars:
                        module.enable_progress_bar()
