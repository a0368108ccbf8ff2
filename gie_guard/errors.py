"""Errors raised by gie_guard.

Every error derives from :class:`GuardError`, so ``except GuardError`` catches all of them::

    GuardError
    ├── PolicyError                a policy file or object is invalid (file, line, place, problem)
    │   └── PolicyNotFoundError    no shipped policy of that name, and no such file
    ├── ConfigurationError         a setting given to gie_guard is invalid (also a ValueError)
    │   └── MissingDependencyError an optional package is not installed (also an ImportError);
    │                              the message names the pip extra, e.g. 'gie-guard[nudity]'
    ├── ConceptError               a concept cannot be encoded for this pipeline (concept id)
    ├── UnsupportedPipelineError   the generator cannot be hooked: nothing is generated unguarded
    ├── GuardedCallError           the guarded call could not be guarded as asked (step window,
    │                              state, a verifier that answered wrongly); output withheld
    ├── UnguardedUseError          a model a guard owns was run outside a guarded call (from_pipe,
    │                              **components, a copy, a hand-written loop); nothing generated
    ├── ContentBlockedError        a verifier found a concept whose action is `block`; output
    │                              withheld (carries the call's report and the detections)
    └── AdapterError               an adapter file is unusable (file, problem)

Each error keeps the context a user needs as attributes, and its message names it. A
``PolicyError`` reads ``file:line:column: place: problem``; :meth:`PolicyError.format` is the
one place that formats it (``gie-guard`` prints it without the column).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import GuardReport
    from .verifiers import Verification

__all__ = [
    "AdapterError",
    "ConceptError",
    "ConfigurationError",
    "ContentBlockedError",
    "GuardError",
    "GuardedCallError",
    "MissingDependencyError",
    "PolicyError",
    "PolicyNotFoundError",
    "UnguardedUseError",
    "UnsupportedPipelineError",
]


class GuardError(Exception):
    """Root of every gie_guard error."""


class PolicyError(GuardError, ValueError):
    """A policy is invalid. ``file``, ``line`` and ``place`` say where; ``problem`` says what."""

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
        place: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = file
        self.line = line
        self.column = column
        self.place = place
        super().__init__(self.format())

    def format(self, *, column: bool = True) -> str:
        """``file:line:column: place: problem``; parts that are unknown are left out, and so is
        the column when ``column`` is False."""
        where = self.file or "<policy>"
        if self.line is not None:
            where += f":{self.line}"
            if column and self.column is not None:
                where += f":{self.column}"
        at = f" {self.place}:" if self.place else ""
        return f"{where}:{at} {self.problem}"


class ConfigurationError(GuardError, ValueError):
    """A setting passed to gie_guard (a keyword argument, a window, a scale) is invalid."""


class MissingDependencyError(ConfigurationError, ImportError):
    """An optional package a setting needs is not installed. ``package`` is the import name,
    ``extra`` the pip extra that installs it (``pip install 'gie-guard[EXTRA]'``)."""

    def __init__(self, package: str, extra: str, *, needed_for: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(f"{needed_for} needs the package {package!r}: pip install 'gie-guard[{extra}]'")
        self.name = package  # ImportError's own attribute: the module that is missing


class PolicyNotFoundError(PolicyError, LookupError):
    """The policy named is neither a shipped policy nor an existing file."""


class ConceptError(GuardError, ValueError):
    """A concept cannot be encoded for this pipeline."""

    def __init__(self, problem: str, *, concept_id: str | None = None) -> None:
        self.problem = problem
        self.concept_id = concept_id
        prefix = f"concept {concept_id!r}: " if concept_id else ""
        super().__init__(prefix + problem)


class UnsupportedPipelineError(GuardError, TypeError):
    """The generator is not something gie_guard can hook; nothing was generated."""


class GuardedCallError(GuardError, RuntimeError):
    """A guarded call could not be guarded as asked; its output, if any, is withheld."""


class UnguardedUseError(GuardError, RuntimeError):
    """A denoiser (or ControlNet) that a Guard owns (``guard.wrap``, ``guard.attached``) was
    run outside a guarded call; nothing was generated. ``guard.release(pipe)`` gives it back."""


class ContentBlockedError(GuardError):
    """A verifier found a concept whose policy action is ``block``; the output is withheld.

    ``report`` is the call's ``GuardReport``, ``verification`` what the verifiers found
    (``gie_guard.verifiers.Verification``), ``concept_ids`` the blocking concepts."""

    def __init__(self, report: GuardReport, verification: Verification) -> None:
        self.report = report
        self.verification = verification
        blocking = [h for h in verification.hits if h.action == "block"]
        self.concept_ids = tuple(dict.fromkeys(h.concept_id for h in blocking))
        where = "; ".join(f"{h.concept_id} in image(s) {list(h.images)} ({h.verifier})" for h in blocking)
        super().__init__(f"output blocked by policy {report.policy_name!r}: residual {where}")


class AdapterError(GuardError, ValueError):
    """An adapter file cannot be used."""

    def __init__(self, problem: str, *, file: str | None = None) -> None:
        self.problem = problem
        self.file = file
        super().__init__(f"{file}: {problem}" if file else problem)
