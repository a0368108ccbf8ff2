"""Moved: the ``gie-guard adapter`` command group is :mod:`gie_guard.cli.adapter`, and
``--pipeline`` is loaded by :mod:`gie_guard.cli.pipelines`. These names stay for old imports."""

from __future__ import annotations

from typing import Any

from ..cli.adapter import register as add_adapter_commands

__all__ = ["add_adapter_commands", "load_pipeline_spec"]


def load_pipeline_spec(spec: str) -> Any:
    """The pipeline ``--pipeline spec`` names (:func:`gie_guard.cli.pipelines.load_pipeline`)."""
    from ..cli.pipelines import load_pipeline

    return load_pipeline(spec).pipe
