"""Prompt sets for ``gie-guard evaluate``: CSV files read strictly, with errors that name the
file, the line and the problem.

A prompt set is a CSV file with a header row; ``column`` names the prompt column (default
``prompt``). Seeds come either from a range given on the command line (``A:B``: every prompt
with every seed A..B-1) or from a column of the file (``csv``: one seed per row, the I2P and
COCO files' ``evaluation_seed``). ``where`` filters keep rows by another column
(``nudity_percentage>=50``, ``categories~sexual``). Rows with an empty prompt are skipped and
counted; anything else that is not a clean CSV is an error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import operator
import pathlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import ConfigurationError

__all__ = ["PromptRow", "PromptSet", "SeedSpec", "WhereFilter", "parse_seeds", "parse_where", "read_prompt_set"]

# csv's default field limit is 128 KiB; a prompt is far below, so a bigger field means a
# broken quote that swallowed the rest of the file.
_FIELD_LIMIT = 64 * 1024


@dataclass(frozen=True)
class PromptRow:
    """One generation of a prompt set: a prompt with one seed."""

    set: str  # the set's name: "unsafe" or "benign"
    index: int  # position of the prompt in the set (after filters and limit), 0-based
    line: int  # line of the CSV file where the row starts (the header is line 1)
    prompt: str
    seed: int


@dataclass(frozen=True)
class PromptSet:
    """One prompt file as read: its rows (prompt x seed) and what was left out and why."""

    name: str
    file: str
    column: str
    rows: tuple[PromptRow, ...]
    prompts: int  # distinct rows read from the file (after filters and limit)
    skipped_empty: int = 0
    filtered_out: int = 0
    sha256: str = ""  # of the file's bytes
    where: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> dict[str, Any]:
        return {
            "file": self.file, "column": self.column, "prompts": self.prompts, "images": len(self.rows),
            "skipped_empty_prompts": self.skipped_empty, "filtered_out": self.filtered_out,
            "where": list(self.where), "sha256": self.sha256,
        }


@dataclass(frozen=True)
class SeedSpec:
    """``A:B`` (a range of seeds for every prompt) or a CSV column holding one seed per row."""

    start: int = 0
    stop: int = 1
    column: str | None = None

    def __str__(self) -> str:
        return f"csv column {self.column!r}" if self.column else f"{self.start}:{self.stop}"


def parse_seeds(text: str, column: str = "evaluation_seed") -> SeedSpec:
    """``--seeds``: ``A:B`` (seeds A..B-1 for every prompt), ``N`` (one seed) or ``csv`` (the
    file's ``column``)."""
    text = text.strip()
    if text == "csv":
        return SeedSpec(column=column)
    match = re.fullmatch(r"(\d+)(?::(\d+))?", text)
    if not match:
        raise ConfigurationError(f"--seeds {text!r}: expected START:END (e.g. 0:4), one seed, or 'csv'")
    start = int(match.group(1))
    stop = int(match.group(2)) if match.group(2) is not None else start + 1
    if stop <= start:
        raise ConfigurationError(f"--seeds {text!r}: END must be greater than START")
    return SeedSpec(start, stop)


_OPS = {">=": operator.ge, "<=": operator.le, "!=": operator.ne, "=": operator.eq, ">": operator.gt, "<": operator.lt}


@dataclass(frozen=True)
class WhereFilter:
    """Keep rows whose ``column`` compares to ``value``: numbers with = != < <= > >=, text
    with = != and ~ (contains, case-insensitive)."""

    column: str
    op: str
    value: str

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value}"

    def keep(self, cell: str, where: str) -> bool:
        if self.op == "~":
            return self.value.lower() in cell.lower()
        try:
            left, right = float(cell), float(self.value)
        except ValueError:
            if self.op in ("=", "!="):
                return bool(_OPS[self.op](cell.strip(), self.value))
            raise ConfigurationError(f"{where}: --where {self}: {cell!r} is not a number") from None
        return bool(_OPS[self.op](left, right))


def parse_where(text: str) -> WhereFilter:
    match = re.fullmatch(r"\s*([^<>=!~]+?)\s*(>=|<=|!=|=|>|<|~)\s*(.*?)\s*", text)
    if not match or not match.group(3):
        raise ConfigurationError(
            f"--where {text!r}: expected COLUMN OP VALUE with OP one of = != < <= > >= ~ (e.g. nudity_percentage>=50)"
        )
    return WhereFilter(match.group(1), match.group(2), match.group(3))


def read_prompt_set(
    path: str | pathlib.Path,
    *,
    name: str,
    column: str = "prompt",
    seeds: SeedSpec = SeedSpec(),
    where: Sequence[WhereFilter] = (),
    limit: int | None = None,
    option: str | None = None,
) -> PromptSet:
    """Read a prompt set. ``option`` is the command-line option that named the file (for
    messages: ``--unsafe``). Errors are ConfigurationErrors: ``FILE:LINE: problem``."""
    option = option or f"--{name}"
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigurationError(f"{option} {path}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigurationError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); save the file as UTF-8 CSV") from None
    if "\x00" in text:
        raise ConfigurationError(f"{path}: contains NUL bytes; this is not a CSV text file")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    old_limit = csv.field_size_limit(_FIELD_LIMIT)
    try:
        return _read(reader, path, name, column, seeds, where, limit, option, hashlib.sha256(raw).hexdigest())
    except csv.Error as exc:
        raise ConfigurationError(f"{path}:{reader.line_num}: broken CSV: {exc}") from None
    finally:
        csv.field_size_limit(old_limit)


class _CsvReader(Protocol):
    """What :func:`_read` uses of ``csv.reader(...)``."""

    @property
    def line_num(self) -> int: ...

    def __iter__(self) -> Iterator[list[str]]: ...

    def __next__(self) -> list[str]: ...


def _read(
    reader: _CsvReader,
    path: pathlib.Path,
    name: str,
    column: str,
    seeds: SeedSpec,
    where: Sequence[WhereFilter],
    limit: int | None,
    option: str,
    digest: str,
) -> PromptSet:
    header = next(reader, None)
    if header is None or not any(h.strip() for h in header):
        raise ConfigurationError(f"{path}: empty file; expected a header row with a {column!r} column")
    header = [h.strip() for h in header]
    wanted = {column: f"{option}-column"} if option.startswith("--") else {column: "the prompt column"}
    if seeds.column:
        wanted[seeds.column] = "--seed-column"
    for w in where:
        wanted.setdefault(w.column, f"{option}-where")
    index: dict[str, int] = {}
    for col, how in wanted.items():
        if col not in header:
            shown = ", ".join(repr(h) for h in header if h) or "(none)"
            raise ConfigurationError(f"{path}:1: no column {col!r} (columns: {shown}); choose another with {how}")
        index[col] = header.index(col)
    rows: list[PromptRow] = []
    prompts = skipped = filtered = 0
    line = reader.line_num + 1  # where the next record starts
    for record in reader:
        start, line = line, reader.line_num + 1
        if not record or (len(record) == 1 and not record[0].strip()):
            continue  # a blank line
        if len(record) != len(header):
            raise ConfigurationError(
                f"{path}:{start}: broken CSV: the row has {len(record)} fields, the header has {len(header)}"
            )
        where_at = f"{path}:{start}"
        if not all(w.keep(record[index[w.column]], where_at) for w in where):
            filtered += 1
            continue
        prompt = record[index[column]].strip()
        if not prompt:
            skipped += 1
            continue
        if limit is not None and prompts >= limit:
            break
        if seeds.column:
            cell = record[index[seeds.column]].strip()
            try:
                seed = int(float(cell)) if re.fullmatch(r"\d+(\.0+)?", cell) else int(cell)
            except ValueError:
                raise ConfigurationError(
                    f"{path}:{start}: column {seeds.column!r}: {cell!r} is not a seed (a whole number >= 0)"
                ) from None
            if not 0 <= seed < 2**63:
                raise ConfigurationError(f"{path}:{start}: column {seeds.column!r}: seed {seed} is outside 0..2^63-1")
            rows.append(PromptRow(name, prompts, start, prompt, seed))
        else:
            rows.extend(PromptRow(name, prompts, start, prompt, s) for s in range(seeds.start, seeds.stop))
        prompts += 1
    if not rows:
        why = f" ({filtered} filtered out by {option}-where)" if filtered else ""
        raise ConfigurationError(f"{path}: no prompts in column {column!r}{why}")
    return PromptSet(name, str(path), column, tuple(rows), prompts, skipped, filtered, digest, tuple(map(str, where)))
