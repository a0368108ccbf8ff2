"""Read a policy file into plain data, safely, remembering the line of every key.

Only plain YAML data is accepted: mappings with text keys, lists, text, numbers, booleans
and null. Anything that could run code or blow up memory is refused before it is built:

- files over ``MAX_POLICY_BYTES`` are refused before they are read in full;
- bytes must be UTF-8;
- only the standard scalar, list and mapping tags (no ``!!python/...``, no timestamps,
  no merge keys ``<<``);
- at most ``MAX_NODES`` values after expanding aliases, so an alias bomb ("billion
  laughs") stops after a fixed amount of work instead of filling memory;
- duplicate keys are errors (YAML libraries usually keep the last one silently).

The document is first *composed* (a node graph that shares aliased nodes, so its size is
bounded by the file size), then walked once to build the data and a table of positions.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..errors import PolicyError
from ..limits import MAX_CONCEPT_TEXTS
from .files import FileProblem, read_regular_file

__all__ = ["MAX_NODES", "MAX_POLICY_BYTES", "PolicyDocument", "format_path", "parse_policy_bytes", "read_policy_file"]

MAX_POLICY_BYTES = 1024 * 1024
# A 1,000-concept policy builds about 15,000 values; leave room for ten times that.
MAX_NODES = 200_000
_MAX_DEPTH = 64

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_T = "tag:yaml.org,2002:"
_SCALARS = {
    _T + "str": SafeConstructor.construct_yaml_str,
    _T + "int": SafeConstructor.construct_yaml_int,
    _T + "float": SafeConstructor.construct_yaml_float,
    _T + "bool": SafeConstructor.construct_yaml_bool,
    _T + "null": SafeConstructor.construct_yaml_null,
}

KeyPath = tuple[str | int, ...]


_MAX_KEY_SHOWN = 64


def _show_key(key: str) -> str:
    # A key path is printed on one line after file:line:, so no control characters, and a
    # long key is cut (a key is the only text of a refused file an error shows).
    shown = "".join(ch if ch.isprintable() else "?" for ch in key)
    return shown if len(shown) <= _MAX_KEY_SHOWN else shown[: _MAX_KEY_SHOWN - 3] + "..."


def format_path(path: KeyPath) -> str:
    """``("concepts", 2, "scale")`` -> ``concepts[2].scale``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{_show_key(part)}" if out else _show_key(str(part)))
    return out


@dataclass(frozen=True)
class PolicyDocument:
    """A parsed file: the data, and 1-based (line, column) of each value and each key by path."""

    data: Any
    file: str | None
    values: Mapping[KeyPath, tuple[int, int]]
    keys: Mapping[KeyPath, tuple[int, int]]

    def where(self, path: KeyPath, *, key: bool = False) -> tuple[int | None, int | None]:
        """Position of ``path``, or of its closest written ancestor (a missing key has none)."""
        table = self.keys if key else self.values
        for cut in range(len(path), -1, -1):
            found = table.get(path[:cut]) or self.values.get(path[:cut])
            if found:
                return found
        return None, None


def read_policy_file(path: str | os.PathLike[str], *, label: str | None = None) -> bytes:
    """The file's bytes, refusing anything over ``MAX_POLICY_BYTES`` before reading it all,
    and anything that is not a regular file before opening it (a FIFO would block).
    A missing file raises ``FileNotFoundError``; every other problem ``PolicyError``."""
    name = label or str(path)
    try:
        return read_regular_file(path, limit=MAX_POLICY_BYTES)
    except FileProblem as exc:
        if exc.kind == "missing":
            raise FileNotFoundError(errno.ENOENT, "no such policy file", name) from None
        if exc.kind == "too-big":
            raise PolicyError(_too_big(None), file=name) from None
        if exc.problem.startswith("is a directory"):
            raise PolicyError("is a directory, not a policy file", file=name) from None
        raise PolicyError(exc.problem, file=name) from None


def _too_big(size: int | None) -> str:
    got = f" ({size:,} bytes)" if size is not None else ""
    return f"file is larger than the {MAX_POLICY_BYTES:,}-byte limit for policies{got}; refusing to parse it"


def parse_policy_bytes(raw: bytes, *, file: str | None = None) -> PolicyDocument:
    """Decode, compose and build one YAML document, raising ``PolicyError`` with a position.

    Messages name positions, key paths and expected types, never the file's text: the
    file may not be a policy at all (a symlink to a secret), and errors end up in logs.
    """
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(_too_big(len(raw)), file=file)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PolicyError("not UTF-8 text; save the file as UTF-8", file=file, line=line) from None
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc, text, file) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        raise PolicyError("invalid YAML: a control character YAML does not allow", file=file, line=line) from None
    except yaml.YAMLError:
        raise PolicyError("invalid YAML", file=file) from None
    except RecursionError:
        raise PolicyError("invalid YAML: nested too deeply", file=file) from None
    if root is None:
        raise PolicyError("the file is empty; a policy needs at least a `name`", file=file, line=1)
    _check_concept_count(root, file)
    builder = _Builder(file)
    try:
        data = builder.build(root, (), 0)
    except RecursionError:  # cannot happen below _MAX_DEPTH, but never let one escape
        raise PolicyError("invalid YAML: nested too deeply", file=file) from None
    return PolicyDocument(data=data, file=file, values=builder.values, keys=builder.keys)


def _check_concept_count(root: Node, file: str | None) -> None:
    """Refuse a file with more concept texts than MAX_CONCEPT_TEXTS before building or
    validating anything: counting composed nodes costs microseconds per concept."""
    if not isinstance(root, MappingNode):
        return
    for key, value in root.value:
        if isinstance(key, ScalarNode) and key.value == "concepts" and isinstance(value, SequenceNode):
            texts = 0
            for item in value.value:
                if not isinstance(item, MappingNode):
                    texts += 1
                    continue
                fields = {k.value: v for k, v in item.value if isinstance(k, ScalarNode)}
                enabled = fields.get("enabled")
                if isinstance(enabled, ScalarNode) and enabled.tag == _T + "bool" \
                        and enabled.value.lower() in ("false", "no", "off"):
                    continue
                aliases = fields.get("aliases")
                texts += 1 + (len(aliases.value) if isinstance(aliases, SequenceNode) else 0)
            if texts > MAX_CONCEPT_TEXTS:
                raise PolicyError(
                    f"{texts:,} concept texts (enabled concepts plus their aliases) in this file; a policy may "
                    f"have at most {MAX_CONCEPT_TEXTS:,} (MAX_CONCEPT_TEXTS), counted before deduplication",
                    file=file, line=key.start_mark.line + 1, column=key.start_mark.column + 1, place="concepts",
                )


# Quoted parts of YAML parser messages are text from the file (an anchor name, a character).
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")


def _quiet(message: str) -> str:
    return " ".join(_QUOTED.sub("a character", message).split())


def _yaml_error(exc: yaml.MarkedYAMLError, text: str, file: str | None) -> PolicyError:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else None
    column = mark.column + 1 if mark else None
    problem = _quiet(exc.problem or "invalid YAML")
    lines = text.splitlines()
    offending = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
    indent = offending[: len(offending) - len(offending.lstrip())]
    if "\t" in indent or (mark is not None and offending[mark.column:mark.column + 1] == "\t"):
        problem = "a tab character is used where YAML allows only spaces (indentation)"
    elif exc.context:
        problem = f"{problem} ({_quiet(exc.context)})"
    return PolicyError(f"invalid YAML: {problem}", file=file, line=line, column=column)


class _Builder:
    """Build plain data from composed nodes, counting every value built (aliases included)."""

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.count = 0
        self.values: dict[KeyPath, tuple[int, int]] = {}
        self.keys: dict[KeyPath, tuple[int, int]] = {}
        self._constructor = SafeConstructor()

    def _fail(self, problem: str, node: Node, path: KeyPath) -> PolicyError:
        return PolicyError(
            problem, file=self.file, line=node.start_mark.line + 1, column=node.start_mark.column + 1,
            place=format_path(path) or None,
        )

    def build(self, node: Node, path: KeyPath, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            # Point at the top-level key being expanded: deep inside an alias bomb every
            # position is the anchor's, which says nothing.
            line, column = self.keys.get(path[:1], (node.start_mark.line + 1, node.start_mark.column + 1))
            raise PolicyError(
                f"more than {MAX_NODES:,} values after expanding YAML aliases; refusing a possible alias bomb",
                file=self.file, line=line, column=column, place=format_path(path[:1]) or None,
            )
        if depth > _MAX_DEPTH:
            raise self._fail(f"nested more than {_MAX_DEPTH} levels deep", node, path)
        self.values.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, SequenceNode):
            if node.tag != _T + "seq":
                raise self._fail(_bad_tag(node.tag), node, path)
            return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
        assert isinstance(node, ScalarNode)  # the composer makes mappings, sequences and scalars only
        return self._scalar(node, path)

    def _mapping(self, node: MappingNode, path: KeyPath, depth: int) -> dict[str, Any]:
        if node.tag != _T + "map":
            raise self._fail(_bad_tag(node.tag), node, path)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _T + "merge":
                raise self._fail("YAML merge keys (<<) are not supported; write the keys out", key_node, path)
            key = self._scalar(key_node, path) if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str):
                raise self._fail("keys must be text", key_node, path)
            if key in out:
                first = self.keys[path + (key,)][0]
                raise self._fail(f"duplicate key {key!r} (first written on line {first})", key_node, path + (key,))
            self.keys[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = self.build(value_node, path + (key,), depth + 1)
        return out

    def _scalar(self, node: ScalarNode, path: KeyPath) -> Any:
        construct = _SCALARS.get(node.tag)
        if construct is None:
            raise self._fail(_bad_tag(node.tag), node, path)
        try:
            return construct(self._constructor, node)
        except (ValueError, OverflowError, ArithmeticError, yaml.YAMLError):
            # e.g. an integer of more digits than Python converts (sys.get_int_max_str_digits)
            raise self._fail("a number too large to read, or a value its YAML type cannot hold", node, path) from None


# Standard YAML types are named in errors; any other tag is text from the file, so it is not.
_KNOWN_TAGS = {"binary", "set", "omap", "pairs", "merge", "value", "yaml", "timestamp", "seq", "map", "str", "int",
               "float", "bool", "null"}


def _bad_tag(tag: str) -> str:
    plain = "policies hold plain data only (text, numbers, lists, mappings)"
    if tag == _T + "timestamp":
        return "dates are not policy values; quote the value to make it text"
    if tag.startswith(_T + "python/"):
        return f"YAML tag !!python/... is not allowed; {plain}"
    if tag.startswith(_T) and tag[len(_T):] in _KNOWN_TAGS:
        return f"YAML tag !!{tag[len(_T):]} is not allowed here; {plain}"
    return f"custom YAML tags (!...) are not allowed; {plain}"
