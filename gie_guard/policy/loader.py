"""Turn a policy source (shipped name, file, dict or ``Policy``) into one flat, valid ``Policy``.

Includes are resolved here: an included policy contributes its concepts (after its own
includes), in include order, before the including policy's own concepts. A concept in the
including policy replaces an included concept with the same id, at the included one's
place; two different included policies that define the same id are an error. Every other
key of an included policy (name, inhibit_steps, ...) is validated but not used.

Every problem becomes a ``PolicyError`` that names the file, the line, the key path
(``concepts[2].scale``) and the problem.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import PolicyError, PolicyNotFoundError
from .schema import AutoScale, Concept, Policy
from .yamlio import PolicyDocument, format_path, parse_policy_bytes, read_policy_file

__all__ = [
    "FlatPolicy",
    "PolicySource",
    "PolicyValidationError",
    "check_policy",
    "read_policy",
    "shipped_policy_dir",
    "shipped_policy_names",
]

PolicySource = str | os.PathLike[str] | Policy | dict[str, Any]

_SUFFIXES = (".yaml", ".yml")
_MAX_INCLUDE_DEPTH = 16
_MAX_FILES = 64


def shipped_policy_dir() -> Path:
    """The folder of policies shipped with gie_guard (installed wheel or source checkout)."""
    try:
        from importlib.resources import files

        return Path(str(files("gie_guard.shipped_policies")))
    except ModuleNotFoundError:
        # A source checkout: the wheel's `gie_guard.shipped_policies` is the top-level policies/.
        return Path(__file__).resolve().parents[2] / "policies"


def shipped_policy_names() -> list[str]:
    folder = shipped_policy_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


@dataclass(frozen=True)
class FlatPolicy:
    """A policy after includes. ``policy.include`` is empty and every auto scale is written out
    in full (each resolved against the defaults of the file that declared the concept)."""

    policy: Policy
    declared_at: dict[str, str]
    files: tuple[str, ...]
    source: str | None


@dataclass
class _Target:
    file: Path
    label: str  # how the file is named in messages
    source: str  # "shipped:nsfw" or the path


@dataclass
class _Reader:
    """One load: remembers every local file it looked at, so a watcher can watch them all."""

    files: list[str] = field(default_factory=list)
    _done: set[str] = field(default_factory=set)

    def read(self, source: PolicySource) -> FlatPolicy:
        if isinstance(source, Policy):
            return self._flatten_root(source, None, Path.cwd(), None)
        if isinstance(source, dict):
            return self._flatten_root(_validate(source, None), None, Path.cwd(), None)
        if isinstance(source, (str, os.PathLike)):
            target = _top_target(source)
            policy, doc = self._read_file(target)
            return self._flatten_root(policy, doc, target.file.parent, target)
        raise PolicyError(f"cannot load a policy from a {type(source).__name__}; give a name, a path, a dict or a Policy")

    def _flatten_root(self, policy: Policy, doc: PolicyDocument | None, base: Path, target: _Target | None) -> FlatPolicy:
        chain = (_key(target.file),) if target else ()
        labels = (target.label,) if target else ("<policy>",)
        concepts, declared = self._flatten(policy, doc, base, chain, labels)
        flat = policy.model_copy(update={"include": (), "concepts": tuple(concepts)})
        return FlatPolicy(policy=flat, declared_at=declared, files=tuple(self.files), source=target.source if target else None)

    def _read_file(self, target: _Target) -> tuple[Policy, PolicyDocument]:
        self.files.append(str(target.file))
        if len(self.files) > _MAX_FILES:
            raise PolicyError(f"more than {_MAX_FILES} policy files in one include tree", file=target.label)
        raw = read_policy_file(target.file, label=target.label)
        doc = parse_policy_bytes(raw, file=target.label)
        return _validate(doc.data, doc), doc

    def _flatten(
        self, policy: Policy, doc: PolicyDocument | None, base: Path, chain: tuple[str, ...], labels: tuple[str, ...]
    ) -> tuple[list[Concept], dict[str, str]]:
        here = labels[-1]
        concepts: dict[str, Concept] = {}
        declared: dict[str, str] = {}
        brought_by: dict[str, str] = {}
        for i, entry in enumerate(policy.include):
            place = ("include", i)
            line = doc.where(place)[0] if doc else None

            def fail(problem: str, cls: type[PolicyError] = PolicyError) -> PolicyError:
                return cls(problem, file=doc.file if doc else None, line=line, place=format_path(place))

            target = _include_target(entry, base, fail)
            key = _key(target.file)
            if key in chain:
                loop = " -> ".join(labels[chain.index(key):] + (target.label,))
                raise fail(f"include cycle: {loop}")
            if len(chain) >= _MAX_INCLUDE_DEPTH:
                raise fail(f"includes nested more than {_MAX_INCLUDE_DEPTH} deep: {' -> '.join(labels)}")
            if key in self._done:
                continue  # already included through another file (a diamond, not a cycle)
            self._done.add(key)
            if not target.file.is_file():
                self.files.append(str(target.file))
                via = " -> ".join(labels + (entry,))
                raise fail(f"included policy {entry!r} not found (looked for {target.file}; include chain: {via})",
                           PolicyNotFoundError)
            sub, sub_doc = self._read_file(target)
            sub_concepts, sub_declared = self._flatten(sub, sub_doc, target.file.parent, chain + (key,), labels + (target.label,))
            for concept in sub_concepts:
                if concept.id in concepts:
                    raise fail(
                        f"concept id {concept.id!r} comes from both {brought_by[concept.id]!r} and {entry!r}; "
                        f"define it in {here} to choose one"
                    )
                concepts[concept.id] = concept
                brought_by[concept.id] = entry
            declared.update(sub_declared)
        for i, concept in enumerate(policy.concepts):
            auto = policy.resolved_auto(concept)
            if auto is not None:
                concept = concept.model_copy(update={"scale": AutoScale(fallback=auto.fallback, min=auto.min, max=auto.max)})
            # Re-assigning a key keeps its first position: an override stays where the original was.
            concepts[concept.id] = concept
            line = doc.where(("concepts", i))[0] if doc else None
            declared[concept.id] = f"{here}:{line}" if line else f"{here} concepts[{i}]"
        return list(concepts.values()), declared


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _top_target(source: str | os.PathLike[str]) -> _Target:
    text = os.fspath(source)
    path = Path(text)
    looks_like_path = text.endswith(_SUFFIXES) or os.sep in text or "/" in text or path.is_file()
    if looks_like_path:
        if not path.is_file():
            if path.is_dir():
                raise PolicyError("is a directory, not a policy file", file=text)
            raise PolicyNotFoundError("no such policy file", file=text)
        return _Target(file=path, label=text, source=str(path))
    return _shipped_target(text, lambda problem: PolicyNotFoundError(problem, file=text))


def _shipped_target(name: str, fail: Any) -> _Target:
    file = shipped_policy_dir() / f"{name}.yaml"
    if not file.is_file():
        known = ", ".join(shipped_policy_names()) or "none"
        raise fail(f"no shipped policy named {name!r} and no such file (shipped policies: {known})")
    return _Target(file=file, label=str(file), source=f"shipped:{name}")


def _include_target(entry: str, base: Path, fail: Any) -> _Target:
    if entry.endswith(_SUFFIXES):
        if os.path.isabs(entry):
            raise fail(f"include {entry!r} is an absolute path; write it relative to this file")
        file = Path(os.path.normpath(base / entry))
        return _Target(file=file, label=str(file), source=str(file))
    if "/" in entry or os.sep in entry:
        raise fail(f"include {entry!r} looks like a path but does not end in .yaml or .yml")
    return _shipped_target(entry, lambda problem: fail(problem, PolicyNotFoundError))


def _validate(data: Any, doc: PolicyDocument | None) -> Policy:
    file = doc.file if doc else None
    if not isinstance(data, dict):
        kind = _kind(data)
        raise PolicyError(f"the top level must be a mapping of policy keys (name, concepts, ...), not {kind}",
                          file=file, line=1 if doc else None)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyValidationError(_problems(exc, data, doc)) from None


class PolicyValidationError(PolicyError):
    """A file that parsed but does not validate. Reads as its first problem (by line);
    ``problems`` holds all of them, for ``gie-guard policy check``."""

    def __init__(self, problems: Sequence[PolicyError]) -> None:
        first = problems[0]
        super().__init__(first.problem, file=first.file, line=first.line, column=first.column, place=first.place)
        self.problems = tuple(problems)


def _problems(exc: ValidationError, data: dict[str, Any], doc: PolicyDocument | None) -> list[PolicyError]:
    found = []
    for err in exc.errors():
        ctx = err.get("ctx") or {}
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ":" in p))
        path = tuple(ctx["path"]) if "path" in ctx else loc
        kind = err["type"]
        is_key = kind == "extra_forbidden"
        if kind == "missing":
            problem, place = f"required key {path[-1]!r} is missing", path[:-1]
        elif is_key:
            problem, place = _unknown_key(path), path
        else:
            problem, place = _describe(err), path
        line, column = doc.where(place, key=is_key) if doc else (None, None)
        found.append(PolicyError(problem, file=doc.file if doc else None, line=line, column=column,
                                 place=format_path(place) or None))
    found.sort(key=lambda e: (e.line or 0, e.column or 0))
    return found


def _unknown_key(path: tuple[Any, ...]) -> str:
    key = path[-1]
    allowed = _allowed_keys(path[:-1])
    hint = difflib.get_close_matches(str(key), allowed, n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"unknown key {key!r}{suggestion} (allowed: {', '.join(allowed)})"


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    if not parent:
        return list(Policy.model_fields)
    if parent[0] == "concepts" and len(parent) == 2:
        return list(Concept.model_fields)
    return list(AutoScale.model_fields)


_MESSAGES = {
    "string_type": "must be text",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "tuple_type": "must be a list",
    "finite_number": "must be a finite number",
}


# Our own cross-field errors (schema.py) already say everything; the value adds nothing.
_OWN = {"duplicate_id", "scale_range", "step_window"}


def _describe(err: dict[str, Any]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind in _OWN:
        return err["msg"]
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch":
        message = "must start with a letter or digit and use only letters, digits, '_', '.' and '-' (64 at most)"
    elif kind == "greater_than_equal":
        message = f"must be >= {ctx['ge']}"
    elif kind == "less_than_equal":
        message = f"must be <= {ctx['le']}"
    elif kind == "literal_error":
        message = f"must be {ctx['expected']}"
    elif kind in ("too_short", "too_long") and err["loc"] == ("inhibit_steps",):
        message = "must be a list of two fractions [start, end]"
    else:
        message = _MESSAGES.get(kind) or err["msg"][:1].lower() + err["msg"][1:]
    got = f" (got {_kind(value)})"
    if kind == "string_type" and isinstance(value, (bool, int, float)):
        got += "; put it in quotes to make it text"
    return message + got


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def read_policy(source: PolicySource, *, files: list[str] | None = None) -> FlatPolicy:
    """Load, validate and flatten ``source``. ``files`` (if given) receives every local file
    looked at, also when loading fails, so a watcher knows what to watch."""
    reader = _Reader()
    try:
        return reader.read(source)
    finally:
        if files is not None:
            files.extend(reader.files)


def check_policy(source: PolicySource) -> list[PolicyError]:
    """Every problem found in ``source`` (validation problems of one file are all reported)."""
    try:
        read_policy(source)
    except PolicyValidationError as exc:
        return list(exc.problems)
    except PolicyError as exc:
        return [exc]
    return []
