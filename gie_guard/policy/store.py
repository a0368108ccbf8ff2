"""Policy snapshots from sources: load once (``load_policy``) or keep one live (``PolicyStore``).

Reloading follows the usual runtime-config rules: read, validate, hash, deduplicate the
*whole* new policy, then swap one immutable snapshot in a single assignment. A broken file
at start-up raises; a broken file on reload is logged and counted and the last good
snapshot stays live. Changes are detected by content hash, never by mtime, because
editors and Kubernetes replace files by rename.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from ..errors import PolicyError
from .dedup import Embedder, deduplicate
from .loader import FlatPolicy, PolicySource, read_policy
from .snapshot import PolicySnapshot, content_hash, expand_concepts
from .yamlio import MAX_POLICY_BYTES

__all__ = ["PolicyStore", "ReloadEvent", "ReloadState", "load_policy"]

log = logging.getLogger("gie_guard.policy")

# When watchfiles reports nothing for this many poll intervals, look anyway: a network file
# system or an overflowing inotify queue can drop events.
_SAFETY_POLLS = 10
_DEBOUNCE_MS = 100


def load_policy(source: PolicySource, *, embedder: Embedder | None = None) -> PolicySnapshot:
    """Load a shipped policy name, a ``.yaml`` path, a ``Policy`` or a dict into a snapshot.

    Raises ``PolicyError`` (``PolicyNotFoundError`` for unknown names and missing files).
    """
    return _compile(read_policy(source), embedder)


def _compile(flat: FlatPolicy, embedder: Embedder | None, digest: str | None = None) -> PolicySnapshot:
    candidates = expand_concepts(flat.policy, flat.declared_at)
    kept, merges = deduplicate(candidates, threshold=flat.policy.dedup_threshold, embedder=embedder)
    return PolicySnapshot(
        policy=flat.policy, concepts=kept, merges=merges,
        content_hash=digest or content_hash(flat.policy, candidates),
        source=flat.source, loaded_at=time.time(), files=flat.files,
    )


@dataclass(frozen=True)
class ReloadState:
    """Counters of a store. ``ok_count`` counts valid loads (the first one, swaps and
    unchanged reloads); ``unchanged_count`` the valid reloads that changed nothing."""

    ok_count: int = 0
    failed_count: int = 0
    unchanged_count: int = 0
    last_error: str | None = None
    last_success_at: float | None = None
    last_attempt_at: float | None = None
    last_result: Literal["success", "failure", "unchanged"] | None = None


@dataclass(frozen=True)
class ReloadEvent:
    """What one reload did. ``snapshot`` is the live snapshot after it (the old one after a failure)."""

    result: Literal["success", "failure", "unchanged"]
    snapshot: PolicySnapshot
    error: PolicyError | None = None


Listener = Callable[[ReloadEvent], None]


class PolicyStore:
    """A live policy. Read ``store.current`` once per generation.

    With ``watch=True`` a daemon thread watches the folders of the policy file and of its
    included files (folders, so rename-swaps are seen) and reloads when their content
    changes; if watchfiles cannot run it polls every ``poll_interval`` seconds instead.
    ``watch="poll"`` polls from the start (for file systems without change events, e.g. NFS).
    """

    def __init__(
        self,
        source: PolicySource,
        *,
        watch: bool | Literal["poll"] = False,
        embedder: Embedder | None = None,
        poll_interval: float = 0.5,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self._source = source
        self._embedder = embedder
        self._poll_interval = poll_interval
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        seen: list[str] = []
        self._current = _compile(read_policy(source, files=seen), embedder)
        self._fingerprint = _fingerprint(seen)
        self._state = ReloadState(ok_count=1, last_success_at=self._current.loaded_at,
                                  last_attempt_at=self._current.loaded_at, last_result="success")
        log.info("policy %r loaded from %s: %d concepts, %d merged", self._current.name, self._current.source,
                 len(self._current.concepts), len(self._current.merges))
        if watch:
            if not self._current.files:
                raise ValueError("watch=True needs a policy file to watch, not a dict or Policy object")
            target = self._poll if watch == "poll" else self._watch
            self._thread = threading.Thread(target=target, name="gie-guard-policy-watch", daemon=True)
            self._thread.start()

    @property
    def current(self) -> PolicySnapshot:
        return self._current

    @property
    def state(self) -> ReloadState:
        return self._state

    @property
    def watching(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __repr__(self) -> str:
        return f"PolicyStore({self._current!r}, watching={self.watching})"

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` after every reload; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def reload(self) -> bool:
        """Load the source again and swap if its content changed. Never raises.

        True if the source is valid (swapped or unchanged), False if it is not (the last good
        snapshot stays live and the error is in ``state.last_error``).
        """
        with self._lock:
            started = time.time()
            seen: list[str] = []
            error: PolicyError | None = None
            try:
                flat = read_policy(self._source, files=seen)
                digest = content_hash(flat.policy, expand_concepts(flat.policy))
                if digest == self._current.content_hash:
                    result: Literal["success", "failure", "unchanged"] = "unchanged"
                else:
                    self._current = _compile(flat, self._embedder, digest)
                    result = "success"
            except PolicyError as exc:
                error, result = exc, "failure"
            except Exception as exc:  # a reload must never take the service down
                log.exception("unexpected error while reloading policy %r", self._current.name)
                error, result = PolicyError(f"unexpected {type(exc).__name__}: {exc}"), "failure"
            self._fingerprint = _fingerprint(seen)
            self._state = self._counted(result, error, started)
            snapshot = self._current
        if error is not None:
            log.warning("policy reload failed, keeping %r (%s): %s", snapshot.name, snapshot.content_hash[:12], error)
        elif result == "success":
            log.info("policy %r reloaded: %d concepts, %d merged, hash %s", snapshot.name, len(snapshot.concepts),
                     len(snapshot.merges), snapshot.content_hash[:12])
        event = ReloadEvent(result=result, snapshot=snapshot, error=error)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("policy reload listener %r failed", listener)
        return error is None

    def _counted(self, result: str, error: PolicyError | None, at: float) -> ReloadState:
        s = self._state
        if error is not None:
            return replace(s, failed_count=s.failed_count + 1, last_error=str(error), last_attempt_at=at,
                           last_result="failure")
        return replace(s, ok_count=s.ok_count + 1, unchanged_count=s.unchanged_count + (result == "unchanged"),
                       last_success_at=at, last_attempt_at=at, last_result=result)  # type: ignore[arg-type]

    def close(self, timeout: float = 5.0) -> None:
        """Stop watching. Returns once the watcher thread has ended (or after ``timeout``)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> PolicyStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- watching ---------------------------------------------------------------------

    def _changed(self) -> bool:
        return _fingerprint([path for path, _ in self._fingerprint]) != self._fingerprint

    def _poke(self) -> None:
        # Reload only when the bytes of some watched file changed (or a file came or went),
        # so unrelated activity in the folder costs a read, not a parse.
        if self._changed():
            self.reload()

    def _folders(self) -> list[str]:
        return sorted({os.path.dirname(os.path.abspath(path)) for path, _ in self._fingerprint
                       if os.path.isdir(os.path.dirname(os.path.abspath(path)))})

    def _watch(self) -> None:
        try:
            import watchfiles

            while not self._stop.is_set():
                folders = self._folders()
                if not folders:
                    raise FileNotFoundError("no folder of the policy files exists")
                for changes in watchfiles.watch(
                    *folders, watch_filter=None, debounce=_DEBOUNCE_MS, step=50, stop_event=self._stop,
                    rust_timeout=int(self._poll_interval * 1000 * _SAFETY_POLLS), yield_on_timeout=True,
                    recursive=False, raise_interrupt=False,
                ):
                    self._poke()
                    if self._stop.is_set() or self._folders() != folders:
                        break  # the include tree moved to other folders: watch those instead
        except Exception as exc:
            if self._stop.is_set():
                return
            log.warning("cannot watch the policy files (%s: %s); polling every %.2fs instead",
                        type(exc).__name__, exc, self._poll_interval)
            self._poll()

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_interval):
            try:
                self._poke()
            except Exception:
                log.exception("policy poll failed")


def _fingerprint(paths: list[str]) -> tuple[tuple[str, str | None], ...]:
    """(path, sha256 of its bytes or None if unreadable) for each path, in order."""
    out = []
    for path in dict.fromkeys(paths):
        try:
            with open(path, "rb") as handle:
                digest = hashlib.sha256(handle.read(MAX_POLICY_BYTES + 1)).hexdigest()
        except OSError:
            digest = None
        out.append((path, digest))
    return tuple(out)
