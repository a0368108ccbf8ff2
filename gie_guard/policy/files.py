"""Read files that an operator (or an attacker who can write into a watched folder) names,
without ever blocking and without reading more than a bound.

Every reader of gie_guard (policies, their includes, adapter files, the hot-reload
watcher, the embedding cache) goes through :func:`open_regular`:

1. ``os.stat`` the path (following symlinks) and refuse anything that is not a regular
   file *before opening it*: a FIFO would block ``open()`` until a writer appears, a
   character device can block reads or never end, a directory cannot be parsed;
2. open with ``O_NONBLOCK`` (and ``O_NOCTTY``), so a path swapped for a FIFO between the
   stat and the open still cannot block;
3. ``fstat`` the open descriptor and refuse it unless it is a regular file, the one
   checked in 1 (same device and inode), so what is read is what was checked.

No torch import: the CLI and the policy store use this module.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO, Literal

__all__ = ["FileProblem", "describe_mode", "file_fingerprint", "open_regular", "read_regular_file"]

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0) \
    | getattr(os, "O_BINARY", 0)

Kind = Literal["missing", "not-regular", "too-big", "unreadable"]


class FileProblem(Exception):
    """Why a file cannot be read. ``kind``: ``missing``, ``not-regular``, ``too-big`` or
    ``unreadable``; ``problem``: a sentence for an error message (never file content)."""

    def __init__(self, kind: Kind, problem: str) -> None:
        super().__init__(problem)
        self.kind = kind
        self.problem = problem


def describe_mode(mode: int) -> str:
    """``a directory``, ``a FIFO (named pipe)``, ... for a non-regular ``st_mode``."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def _not_regular(mode: int) -> FileProblem:
    what = describe_mode(mode)
    if what == "a directory":
        return FileProblem("not-regular", "is a directory, not a file")
    return FileProblem("not-regular", f"is {what}, not a regular file; refusing to open it")


def _os_problem(exc: OSError) -> FileProblem:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return FileProblem("missing", "no such file")
    return FileProblem("unreadable", f"cannot read the file ({exc.strerror or type(exc).__name__})")


def _too_big(limit: int, size: int | None) -> FileProblem:
    got = f" ({size:,} bytes)" if size is not None else ""
    return FileProblem("too-big", f"file is larger than the {limit:,}-byte limit{got}; refusing to read it")


@contextmanager
def open_regular(path: str | os.PathLike[str], *, limit: int) -> Iterator[tuple[BinaryIO, int]]:
    """``(binary file, size)`` of a regular file no larger than ``limit`` bytes, checked as
    the module docstring says; raises :class:`FileProblem` otherwise. Never blocks."""
    try:
        before = os.stat(path)
    except OSError as exc:
        raise _os_problem(exc) from None
    except ValueError:  # a NUL byte in the path
        raise FileProblem("missing", "no such file") from None
    if not stat.S_ISREG(before.st_mode):
        raise _not_regular(before.st_mode)
    if before.st_size > limit:
        raise _too_big(limit, before.st_size)
    try:
        fd = os.open(path, _FLAGS)
    except OSError as exc:
        raise _os_problem(exc) from None
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode):
            raise _not_regular(now.st_mode)
        if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            # replaced between stat and open (a rename swap): read it on the next attempt
            raise FileProblem("unreadable", "the file was replaced while it was being opened; try again")
        if now.st_size > limit:
            raise _too_big(limit, now.st_size)
        handle = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle, now.st_size


def read_regular_file(path: str | os.PathLike[str], *, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (also if it grows while read)."""
    with open_regular(path, limit=limit) as (handle, _):
        try:
            raw = _read_upto(handle, limit + 1)
        except OSError as exc:
            raise _os_problem(exc) from None
    if len(raw) > limit:
        raise _too_big(limit, None)
    return raw


def _read_upto(handle: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = handle.read(min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


Fingerprint = tuple[str, ...]


def file_fingerprint(path: str | os.PathLike[str], *, limit: int) -> Fingerprint:
    """What a watcher compares: ``("file", sha256 of the first limit+1 bytes)``, or
    ``("missing",)``, ``("not-regular", kind)``, ``("unreadable", reason)``. Never blocks."""
    try:
        with open_regular(path, limit=1 << 62) as (handle, _):
            raw = _read_upto(handle, limit + 1)
    except FileProblem as exc:
        return (exc.kind, exc.problem)
    except OSError as exc:
        return ("unreadable", exc.strerror or type(exc).__name__)
    return ("file", hashlib.sha256(raw).hexdigest())


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()
