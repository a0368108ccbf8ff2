"""Turn a policy source (shipped name, file, dict or ``Policy``) into one flat, valid ``Policy``.

Includes are resolved here: an included policy contributes its concepts (after its own
includes), in include order, before the including policy's own concepts. A concept in the
including policy replaces an included concept with the same id, at the included one's
place; two different included policies that define the same id are an error. Every other
key of an included policy (name, inhibit_steps, ...) is validated but not used.

Every problem becomes a ``PolicyError`` that names the file, the line, the key path
(``concepts[2].scale``) and the problem. Messages never quote a value of the file (only key
paths and expected types): a file that fails to load may not be a policy at all.

Includes are confined: a path include must resolve (symlinks followed) inside the
top-level policy's folder or one of the ``roots`` the caller names; shipped policies are
included by name. Nothing outside is opened.
"""

from __future__ import annotations

import difflib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import PolicyError, PolicyNotFoundError
from ..limits import MAX_CONCEPT_TEXTS, MAX_CONCEPTS, MAX_SCALE
from .files import describe_mode, sha256
from .schema import AutoScale, Concept, Policy, Presence
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
Roots = Sequence[str | os.PathLike[str]]

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
    shipped: bool = False


@dataclass
class _Reader:
    """One load: remembers every local file it looked at (so a watcher can watch them all)
    and the sha256 of the bytes it parsed from each."""

    roots: tuple[str, ...] = ()
    files: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)
    _allowed: tuple[str, ...] = ()

    def read(self, source: PolicySource) -> FlatPolicy:
        if isinstance(source, Policy):
            self._allow(Path.cwd())
            return self._flatten_root(source, None, Path.cwd(), None)
        if isinstance(source, dict):
            self._allow(Path.cwd())
            return self._flatten_root(_validate(source, None), None, Path.cwd(), None)
        if isinstance(source, (str, os.PathLike)):
            target = _top_target(source)
            self._allow(target.file.parent if not target.shipped else shipped_policy_dir())
            policy, doc = self._read_file(target)
            return self._flatten_root(policy, doc, target.file.parent, target)
        raise PolicyError(f"cannot load a policy from a {type(source).__name__}; give a name, a path, a dict or a Policy")

    def _allow(self, top_folder: Path) -> None:
        folders = [os.path.abspath(top_folder), *(os.path.abspath(os.fspath(r)) for r in self.roots)]
        self._allowed = tuple(dict.fromkeys(os.path.realpath(f) for f in folders))

    def _flatten_root(self, policy: Policy, doc: PolicyDocument | None, base: Path, target: _Target | None) -> FlatPolicy:
        chain = (_key(target.file),) if target else ()
        labels = (target.label,) if target else ("<policy>",)
        concepts, declared = self._flatten(policy, doc, base, chain, labels, target)
        flat = policy.model_copy(update={"include": (), "concepts": tuple(concepts)})
        _check_counts(flat, target.label if target else None)
        return FlatPolicy(policy=flat, declared_at=declared, files=tuple(self.files), source=target.source if target else None)

    def _read_file(self, target: _Target) -> tuple[Policy, PolicyDocument]:
        self.files.append(str(target.file))
        if len(self.files) > _MAX_FILES:
            raise PolicyError(f"more than {_MAX_FILES} policy files in one include tree", file=target.label)
        raw = read_policy_file(target.file, label=target.label)
        self.digests[str(target.file)] = sha256(raw)
        doc = parse_policy_bytes(raw, file=target.label)
        return _validate(doc.data, doc), doc

    def _confined(self, target: _Target, including: _Target | None) -> str | None:
        """None if ``target`` may be read from ``including``; else the resolved path."""
        allowed = self._allowed
        if including is not None and including.shipped:
            allowed = allowed + (os.path.realpath(shipped_policy_dir()),)
        real = os.path.realpath(target.file)
        for folder in allowed:
            if real == folder or real.startswith(folder.rstrip(os.sep) + os.sep):
                return None
        return real

    def _flatten(
        self, policy: Policy, doc: PolicyDocument | None, base: Path, chain: tuple[str, ...], labels: tuple[str, ...],
        including: _Target | None,
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
            if not target.shipped:
                outside = self._confined(target, including)
                if outside is not None:
                    raise fail(
                        f"include {entry!r} resolves to {outside}, outside the folders policies may include from "
                        f"({', '.join(self._allowed)}); move the file there, or name its folder in roots="
                    )
            key = _key(target.file)
            if key in chain:
                loop = " -> ".join(labels[chain.index(key):] + (target.label,))
                raise fail(f"include cycle: {loop}")
            if len(chain) >= _MAX_INCLUDE_DEPTH:
                raise fail(f"includes nested more than {_MAX_INCLUDE_DEPTH} deep: {' -> '.join(labels)}")
            if key in self._done:
                continue  # already included through another file (a diamond, not a cycle)
            self._done.add(key)
            try:
                mode = os.stat(target.file).st_mode
            except (OSError, ValueError):
                self.files.append(str(target.file))
                via = " -> ".join(labels + (entry,))
                raise fail(f"included policy {entry!r} not found (looked for {target.file}; include chain: {via})",
                           PolicyNotFoundError) from None
            if not stat.S_ISREG(mode):
                self.files.append(str(target.file))
                raise fail(f"included policy {entry!r} is {describe_mode(mode)}, not a regular file")
            try:
                sub, sub_doc = self._read_file(target)
            except FileNotFoundError:  # removed since the stat
                via = " -> ".join(labels + (entry,))
                raise fail(f"included policy {entry!r} not found (looked for {target.file}; include chain: {via})",
                           PolicyNotFoundError) from None
            sub_concepts, sub_declared = self._flatten(sub, sub_doc, target.file.parent, chain + (key,),
                                                       labels + (target.label,), target)
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


def _check_counts(policy: Policy, file: str | None) -> None:
    texts = sum(1 + len(c.aliases) for c in policy.concepts if c.enabled)
    if texts > MAX_CONCEPT_TEXTS:
        raise PolicyError(
            f"{texts:,} concept texts (enabled concepts plus aliases, after includes); a policy may have at most "
            f"{MAX_CONCEPT_TEXTS:,} (MAX_CONCEPT_TEXTS), counted before deduplication", file=file, place="concepts",
        )
    if policy.dedup_threshold <= 0 and texts > MAX_CONCEPTS:
        raise PolicyError(
            f"{texts:,} concepts with deduplication off (dedup_threshold: 0); a policy may apply at most "
            f"{MAX_CONCEPTS:,} (MAX_CONCEPTS)", file=file, place="concepts",
        )


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _top_target(source: str | os.PathLike[str]) -> _Target:
    text = os.fspath(source)
    if "\0" in text:
        raise PolicyNotFoundError("no such policy file", file=repr(text))
    path = Path(text)
    try:
        mode: int | None = os.stat(path).st_mode
    except (OSError, ValueError):
        mode = None
    looks_like_path = text.endswith(_SUFFIXES) or os.sep in text or "/" in text or mode is not None
    if looks_like_path:
        if mode is None:
            raise PolicyNotFoundError("no such policy file", file=text)
        if stat.S_ISDIR(mode):
            raise PolicyError("is a directory, not a policy file", file=text)
        if not stat.S_ISREG(mode):
            raise PolicyError(f"is {describe_mode(mode)}, not a regular file; refusing to open it", file=text)
        return _Target(file=path, label=text, source=str(path))
    return _shipped_target(text, lambda problem: PolicyNotFoundError(problem, file=text))


def _shipped_target(name: str, fail: Any) -> _Target:
    file = shipped_policy_dir() / f"{name}.yaml"
    if not name or not _is_regular(file):
        known = ", ".join(shipped_policy_names()) or "none"
        raise fail(f"no shipped policy named {name!r} and no such file (shipped policies: {known})")
    return _Target(file=file, label=str(file), source=f"shipped:{name}", shipped=True)


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _include_target(entry: str, base: Path, fail: Any) -> _Target:
    if "\0" in entry:
        raise fail("include names a path with a NUL character")
    if entry.endswith(_SUFFIXES):
        if os.path.isabs(entry):
            raise fail(f"include {entry!r} is an absolute path; write it relative to this file")
        file = Path(os.path.normpath(base / entry))
        return _Target(file=file, label=str(file), source=str(file))
    if "/" in entry or os.sep in entry:
        raise fail(f"include {entry!r} looks like a path but does not end in .yaml or .yml")
    if entry in (".", "..") or entry.startswith("."):
        raise fail(f"no shipped policy named {entry!r}", PolicyNotFoundError)
    return _shipped_target(entry, lambda problem: fail(problem, PolicyNotFoundError))


def _validate(data: Any, doc: PolicyDocument | None) -> Policy:
    file = doc.file if doc else None
    if not isinstance(data, dict):
        kind = _kind(data)
        raise PolicyError(f"the top level must be a mapping of policy keys (name, concepts, ...), not {kind}",
                          file=file, line=1 if doc else None)
    if data and not any(key in Policy.model_fields for key in data):
        # Not a policy at all (a credentials file, another tool's config): naming its keys
        # would print its content, so say only that.
        raise PolicyError(
            f"not a policy: none of its {len(data)} top-level keys is a policy key "
            f"({', '.join(Policy.model_fields)})", file=file, line=1 if doc else None,
        )
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyValidationError(_problems(exc, data, doc)) from None
    except (RecursionError, OverflowError, ArithmeticError) as exc:
        raise PolicyError(f"cannot validate the policy ({type(exc).__name__})", file=file) from None
    if "concepts" not in data:
        # A policy is complete or it is not a policy: a file cut short before its concepts (a full
        # disk, a writer that died) must not go live as a policy that erases nothing.
        last = max((line for line, _ in doc.values.values()), default=None) if doc is not None else None
        raise PolicyError(
            "no 'concepts' key: a policy lists its concepts (write 'concepts: []' for a policy that erases "
            "nothing); a file cut short is not loaded", file=file, line=last, place="concepts",
        )
    return policy


class PolicyValidationError(PolicyError):
    """A file that parsed but does not validate. Reads as its first problem (by line);
    ``problems`` holds all of them, for ``gie-guard policy check``."""

    def __init__(self, problems: Sequence[PolicyError]) -> None:
        first = problems[0]
        super().__init__(first.problem, file=first.file, line=first.line, column=first.column, place=first.place)
        self.problems = tuple(problems)


_UNION_TAGS = frozenset({"scale:number", "scale:word", "scale:mapping"})


def _problems(exc: ValidationError, data: dict[str, Any], doc: PolicyDocument | None) -> list[PolicyError]:
    found = []
    for err in exc.errors():
        ctx = err.get("ctx") or {}
        # drop the scale union's discriminator tags ("scale:number"), never a key of the file
        # (a key may hold ':' too: "v!!python/name:os.system ersion" once crashed this)
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
        path = loc + tuple(ctx["path"]) if "path" in ctx else loc  # ctx paths are relative to the model
        kind = err["type"]
        is_key = kind == "extra_forbidden"
        if kind == "missing":
            problem, place = f"required key {path[-1]!r} is missing", path[:-1]
        elif is_key:
            problem, place = _unknown_key(path), path
        else:
            problem, place = _describe(dict(err)), path
        line, column = doc.where(place, key=is_key) if doc else (None, None)
        found.append(PolicyError(problem, file=doc.file if doc else None, line=line, column=column,
                                 place=format_path(place) or None))
    found.sort(key=lambda e: (e.line or 0, e.column or 0))
    return found


def _unknown_key(path: tuple[Any, ...]) -> str:
    key = str(path[-1])
    allowed = _allowed_keys(path[:-1])
    hint = difflib.get_close_matches(key, allowed, n=1) if len(key) <= 64 else []
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"unknown key {format_path((key,))!r}{suggestion} (allowed: {', '.join(allowed)})"


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    if not parent:
        return list(Policy.model_fields)
    if parent[-1] == "presence":
        return list(Presence.model_fields)
    if parent[0] == "concepts" and len(parent) == 2:
        return list(Concept.model_fields)
    if parent[0] == "concepts" and len(parent) == 3 and parent[2] == "verify":
        from .schema import Verify

        return list(Verify.model_fields)
    return list(AutoScale.model_fields)


# Type errors: the message says what was expected, ``got`` says the type found.
_TYPE_ERRORS = {
    "string_type": "must be text",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
}

# Our own cross-field errors (schema.py) say everything without quoting values.
_OWN = {"duplicate_id", "scale_range", "scale_too_small", "step_window", "scale_type", "anchor_is_concept", "presence_threshold"}

# pydantic messages that state only the rule (no input value); anything else is replaced by
# a generic sentence, so no message can echo the file's content.
_RULE_ONLY = {"string_too_long", "too_long", "too_short"}


def _describe(err: dict[str, Any]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind in _OWN:
        return str(err["msg"])
    if kind in _TYPE_ERRORS:
        message = f"{_TYPE_ERRORS[kind]} (got {_kind(value)})"
        if kind == "string_type" and isinstance(value, (bool, int, float)):
            message += "; put it in quotes to make it text"
        return message
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch":
        return "must start with a letter or digit and use only letters, digits, '_', '.' and '-' (64 at most)"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if kind == "less_than_equal":
        bound = ctx["le"]
        why = " (MAX_SCALE: the largest suppression scale gie_guard applies)" if bound == MAX_SCALE else ""
        return f"must be <= {bound}{why}"
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind in ("too_short", "too_long") and err["loc"] == ("inhibit_steps",):
        return "must be a list of two fractions [start, end]"
    if kind in _RULE_ONLY:
        message = str(err["msg"])
        return message[:1].lower() + message[1:]
    return f"invalid value ({kind})"


def _kind(value: Any) -> str:
    """The type of a value, in words; never the value itself."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return f"a {type(value).__name__}"


def read_policy(
    source: PolicySource,
    *,
    files: list[str] | None = None,
    roots: Roots | None = None,
    digests: dict[str, str] | None = None,
) -> FlatPolicy:
    """Load, validate and flatten ``source``. ``files`` (if given) receives every local file
    looked at, also when loading fails, so a watcher knows what to watch; ``digests`` the
    sha256 of the bytes parsed from each file read.

    ``roots``: folders that path includes may resolve into, besides the folder of the
    top-level policy file (the working directory for a dict or ``Policy``). An include that
    resolves elsewhere (``../../secret.yaml``, a symlink out) is refused unread."""
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]  # one folder, not the characters of a path
    reader = _Reader(roots=tuple(os.fspath(r) for r in roots or ()))
    try:
        return reader.read(source)
    finally:
        if files is not None:
            files.extend(reader.files)
        if digests is not None:
            digests.update(reader.digests)


def check_policy(source: PolicySource, *, roots: Roots | None = None) -> list[PolicyError]:
    """Every problem found in ``source`` (validation problems of one file are all reported)."""
    try:
        read_policy(source, roots=roots)
    except PolicyValidationError as exc:
        return list(exc.problems)
    except PolicyError as exc:
        return [exc]
    return []
