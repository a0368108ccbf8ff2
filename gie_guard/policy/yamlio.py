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

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..errors import PolicyError

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


def format_path(path: KeyPath) -> str:
    """``("concepts", 2, "scale")`` -> ``concepts[2].scale``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
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
    """The file's bytes, refusing anything over ``MAX_POLICY_BYTES`` before reading it all."""
    name = label or str(path)
    try:
        size = os.stat(path).st_size
        if size > MAX_POLICY_BYTES:
            raise PolicyError(_too_big(size), file=name)
        with open(path, "rb") as handle:
            # stat() can lie (pipes, /proc), so never read past the limit either.
            raw = handle.read(MAX_POLICY_BYTES + 1)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise PolicyError("is a directory, not a policy file", file=name) from None
    except OSError as exc:
        raise PolicyError(f"cannot read the file ({exc.strerror or exc})", file=name) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(_too_big(None), file=name)
    return raw


def _too_big(size: int | None) -> str:
    got = f" ({size:,} bytes)" if size is not None else ""
    return f"file is larger than the {MAX_POLICY_BYTES:,}-byte limit for policies{got}; refusing to parse it"


def parse_policy_bytes(raw: bytes, *, file: str | None = None) -> PolicyDocument:
    """Decode, compose and build one YAML document, raising ``PolicyError`` with a position."""
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(_too_big(len(raw)), file=file)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PolicyError(
            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} cannot be decoded; save the file as UTF-8",
            file=file, line=line,
        ) from None
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc, text, file) from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"invalid YAML: {exc}", file=file) from None
    except RecursionError:
        raise PolicyError("invalid YAML: nested too deeply", file=file) from None
    if root is None:
        raise PolicyError("the file is empty; a policy needs at least a `name`", file=file, line=1)
    builder = _Builder(file)
    data = builder.build(root, (), 0)
    return PolicyDocument(data=data, file=file, values=builder.values, keys=builder.keys)


def _yaml_error(exc: yaml.MarkedYAMLError, text: str, file: str | None) -> PolicyError:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else None
    column = mark.column + 1 if mark else None
    problem = exc.problem or "invalid YAML"
    lines = text.splitlines()
    offending = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
    indent = offending[: len(offending) - len(offending.lstrip())]
    if "\t" in indent or (mark is not None and offending[mark.column:mark.column + 1] == "\t"):
        problem = "a tab character is used where YAML allows only spaces (indentation)"
    elif exc.context:
        problem = f"{problem} ({exc.context})"
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
        return construct(self._constructor, node)


def _bad_tag(tag: str) -> str:
    shown = "!!" + tag[len(_T):] if tag.startswith(_T) else tag
    if tag == _T + "timestamp":
        return "dates are not policy values; quote the value to make it text"
    return f"YAML tag {shown} is not allowed; policies hold plain data only (text, numbers, lists, mappings)"
