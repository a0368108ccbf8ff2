"""Errors raised by gie_guard.

Every error derives from :class:`GuardError`, so ``except GuardError`` catches all of them::

    GuardError
    ├── PolicyError              a policy file or object is invalid (file, place, problem)
    │   └── PolicyNotFoundError  no shipped policy of that name, and no such file
    ├── ConceptError             a concept cannot be encoded for this pipeline (concept id)
    ├── UnsupportedPipelineError the generator cannot be hooked: nothing is generated unguarded
    ├── GuardedCallError         the guarded call could not be guarded as asked (step window, state)
    ├── ContentBlockedError      a verifier found a concept whose action is `block`; output withheld
    │                            (defined in gie_guard.verifiers, it carries the call's report)
    └── AdapterError             an adapter file is unusable (file, problem)

Each error keeps the context a user needs as attributes, and its message names it.
"""

from __future__ import annotations


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
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.file or "<policy>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        at = f" {self.place}:" if self.place else ""
        return f"{where}:{at} {self.problem}"


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


class AdapterError(GuardError, ValueError):
    """An adapter file cannot be used."""

    def __init__(self, problem: str, *, file: str | None = None) -> None:
        self.problem = problem
        self.file = file
        super().__init__(f"{file}: {problem}" if file else problem)
