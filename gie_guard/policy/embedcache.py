"""A content-addressed on-disk cache of the embeddings deduplication computes.

Loading the embedding model takes seconds and embedding a 1,000-concept policy more; a
service restart (or a second process) that finds every text in this cache needs neither.

- Key: sha256 of the embedder's ``cache_identity`` and the text. An embedder without a
  ``cache_identity`` (any object with ``encode``) is never cached on disk: only it knows
  what its vectors depend on.
- Folder: ``cache_dir`` if given; else ``$GIE_GUARD_CACHE_DIR``; else
  ``$XDG_CACHE_HOME/gie-guard`` or ``~/.cache/gie-guard``. ``GIE_GUARD_CACHE_DIR=""`` or
  ``cache_dir=False`` turns it off.
- One small file per text (``embeddings-v1/ab/abcdef....vec``): a header (dtype, length),
  the vector exactly as the embedder returned it, and a checksum over key, header and
  vector. Written to a temporary file and renamed (atomic); a file that is truncated,
  corrupt, of another dtype or length, or not a regular file is ignored and rewritten.
- The cache never raises: a folder that cannot be created or written only costs speed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from .files import FileProblem, read_regular_file

__all__ = ["ENV_VAR", "CacheDir", "EmbeddingCache", "default_cache_dir", "embedding_cache"]

log = logging.getLogger("gie_guard.policy")

ENV_VAR = "GIE_GUARD_CACHE_DIR"
CacheDir = Union[str, "os.PathLike[str]", bool, None]

_MAGIC = b"GGEMB1"
_HEADER = struct.Struct("<6sBBI")  # magic, dtype code, reserved, length
_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("<f4"), 2: np.dtype("<f8")}
_CHECK = 16
_MAX_FILE = 1 << 20
_MEMORY = 20_000  # vectors kept in memory per folder (about 30 MB at 384 floats)


def default_cache_dir() -> Path | None:
    """The folder used when none is given (None: caching is off)."""
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gie-guard"


def _resolve(cache_dir: CacheDir) -> Path | None:
    if cache_dir is None or cache_dir is True:
        return default_cache_dir()
    if cache_dir is False or (isinstance(cache_dir, str) and not cache_dir.strip()):
        return None
    return Path(os.fspath(cache_dir)).expanduser()


class EmbeddingCache:
    """Vectors by (embedder identity, text) in ``folder``; thread-safe; never raises."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._root = self.folder / "embeddings-v1"
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._write_failed = False

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.folder)!r})"

    @staticmethod
    def key(identity: str, text: str) -> str:
        blob = identity.encode("utf-8", "surrogatepass") + b"\0" + text.encode("utf-8", "surrogatepass")
        return hashlib.sha256(blob).hexdigest()

    def _path(self, key: str) -> Path:
        return self._root / key[:2] / f"{key}.vec"

    def get_many(self, identity: str, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors of those ``texts`` that have one."""
        found: dict[str, np.ndarray] = {}
        for text in texts:
            key = self.key(identity, text)
            with self._lock:
                vector = self._memory.get(key)
                if vector is not None:
                    self._memory.move_to_end(key)
            if vector is None:
                vector = self._read(key)
                if vector is not None:
                    self._remember(key, vector)
            if vector is not None:
                found[text] = vector
        return found

    def put_many(self, identity: str, texts: Sequence[str], vectors: np.ndarray) -> None:
        for text, vector in zip(texts, vectors):
            key = self.key(identity, text)
            vector = np.array(vector, copy=True)
            self._remember(key, vector)
            self._write(key, vector)

    def _remember(self, key: str, vector: np.ndarray) -> None:
        with self._lock:
            self._memory[key] = vector
            self._memory.move_to_end(key)
            while len(self._memory) > _MEMORY:
                self._memory.popitem(last=False)

    def _read(self, key: str) -> np.ndarray | None:
        try:
            raw = read_regular_file(self._path(key), limit=_MAX_FILE)
        except (FileProblem, OSError):
            return None
        try:
            magic, code, _, length = _HEADER.unpack_from(raw)
            dtype = _DTYPES[code]
            end = _HEADER.size + length * dtype.itemsize
            if magic != _MAGIC or len(raw) != end + _CHECK:
                return None
            if hashlib.sha256(key.encode() + raw[:end]).digest()[:_CHECK] != raw[end:]:
                return None
            return np.frombuffer(raw, dtype=dtype, count=length, offset=_HEADER.size).copy()
        except (struct.error, KeyError, ValueError):
            return None

    def _write(self, key: str, vector: np.ndarray) -> None:
        code = 1 if vector.dtype == np.float32 else 2 if vector.dtype == np.float64 else None
        if code is None or vector.ndim != 1 or self._write_failed:
            return  # only float32/float64 vectors are cached
        body = _HEADER.pack(_MAGIC, code, 0, vector.shape[0]) + vector.astype(_DTYPES[code], copy=False).tobytes()
        blob = body + hashlib.sha256(key.encode() + body).digest()[:_CHECK]
        path = self._path(key)
        temp = None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            with os.fdopen(fd, "wb") as handle:
                handle.write(blob)
            os.replace(temp, path)  # atomic: readers see the old file or the new one
            temp = None
        except OSError as exc:
            self._write_failed = True  # read-only or full: stop trying, keep working
            log.debug("embedding cache %s is not writable (%s); continuing without writing", self.folder, exc)
        finally:
            if temp is not None:
                try:
                    os.unlink(temp)
                except OSError:
                    pass


_CACHES: dict[str, EmbeddingCache] = {}
_CACHES_LOCK = threading.Lock()


def embedding_cache(cache_dir: CacheDir = None) -> EmbeddingCache | None:
    """The process-wide cache for ``cache_dir`` (see the module docstring), or None if off."""
    folder = _resolve(cache_dir)
    if folder is None:
        return None
    with _CACHES_LOCK:
        cache = _CACHES.get(str(folder))
        if cache is None:
            cache = _CACHES[str(folder)] = EmbeddingCache(folder)
        return cache
