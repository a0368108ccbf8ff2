"""Policy snapshots from sources: load once (``load_policy``) or keep one live (``PolicyStore``).

Reloading follows the usual runtime-config rules: read, validate, hash, deduplicate the
*whole* new policy, then swap one immutable snapshot in a single assignment. A broken file
at start-up raises; a broken file on reload is logged and counted and the last good
snapshot stays live. Changes are detected by content hash, never by mtime, because
editors and Kubernetes replace files by rename.

The watcher keeps watching the policy file and every file it ever included, whatever the
last read found (a missing file, a directory in its place, an unreadable file), so it
always recovers once a valid policy is back. It swaps only content that stayed the same
for ``settle`` seconds, so a file caught half-written is not put live.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..errors import PolicyError
from ..limits import MAX_CONCEPTS
from .dedup import Embedder, EmbeddingUnavailable, deduplicate
from .embedcache import CacheDir
from .files import file_fingerprint
from .loader import FlatPolicy, PolicySource, Roots, read_policy
from .snapshot import EffectiveConcept, PolicySnapshot, content_hash, expand_concepts
from .yamlio import MAX_POLICY_BYTES

__all__ = ["PolicyStore", "ReloadEvent", "ReloadState", "load_policy"]

log = logging.getLogger("gie_guard.policy")

# When watchfiles reports nothing for this many poll intervals (at most _MAX_QUIET_S),
# look anyway: a network file system or an overflowing inotify queue can drop events, and a
# watch can miss what happened while it was being re-armed.
_SAFETY_POLLS = 10
_MAX_QUIET_S = 1.0
_DEBOUNCE_MS = 100
# Content must be unchanged for this long before it is swapped in: a writer that writes a
# file in several chunks (or truncates, then writes) is not caught half-way.
DEFAULT_SETTLE_S = 0.5
# After watchfiles fails (e.g. its folder vanished mid-watch), poll this long, then watch again.
_RETRY_WATCH_S = 5.0
# Files remembered for watching (the policy and every file it ever included).
_MAX_WATCHED = 1024
# A reload that failed for a reason other than the policy's own content (an embedder or a
# pipeline's tokenizer busy or broken for a moment) is retried after these delays, the last
# one repeated, until it succeeds or fails on the content.
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)

Validator = Callable[[PolicySnapshot], Any]


def load_policy(
    source: PolicySource,
    *,
    embedder: Embedder | None = None,
    roots: Roots | None = None,
    cache_dir: CacheDir = None,
) -> PolicySnapshot:
    """Load a shipped policy name, a ``.yaml`` path, a ``Policy`` or a dict into a snapshot.

    ``roots``: extra folders path includes may resolve into (see ``read_policy``).
    ``cache_dir``: the embedding cache folder; None for the default, False for none.
    Raises ``PolicyError`` (``PolicyNotFoundError`` for unknown names and missing files).
    """
    return _compile(read_policy(source, roots=roots), embedder, cache_dir=cache_dir)


def _compile(flat: FlatPolicy, embedder: Embedder | None, digest: str | None = None, *,
             cache_dir: CacheDir = None) -> PolicySnapshot:
    candidates = expand_concepts(flat.policy, flat.declared_at)
    try:
        kept, merges = deduplicate(candidates, threshold=flat.policy.dedup_threshold, embedder=embedder,
                                   cache_dir=cache_dir)
    except PolicyError as exc:
        if exc.file is not None:
            raise
        raise type(exc)(exc.problem, file=flat.source, place="concepts") from exc.__cause__
    if len(kept) > MAX_CONCEPTS:
        raise PolicyError(
            f"{len(kept):,} concepts after deduplication ({len(candidates):,} texts before); a policy may apply at "
            f"most {MAX_CONCEPTS:,} (MAX_CONCEPTS)", file=flat.source, place="concepts",
        )
    warnings = _anchor_warnings(kept, flat, embedder, cache_dir)
    for warning in warnings:
        log.warning("policy %s: %s", flat.source or flat.policy.name, warning)
    return PolicySnapshot(
        policy=flat.policy, concepts=kept, merges=merges,
        content_hash=digest or content_hash(flat.policy, candidates),
        source=flat.source, loaded_at=time.time(), files=flat.files, warnings=warnings,
    )


def _anchor_warnings(kept: tuple[EffectiveConcept, ...], flat: FlatPolicy, embedder: Embedder | None,
                     cache_dir: CacheDir) -> tuple[str, ...]:
    """Near-synonym anchors (``anchors.synonym_anchor_warnings``). A warning, not a load
    failure, so it must not fail the load either: an embedder error is one more warning."""
    from .anchors import synonym_anchor_warnings

    try:
        return synonym_anchor_warnings(kept, threshold=flat.policy.dedup_threshold, embedder=embedder,
                                       cache_dir=cache_dir)
    except Exception as exc:
        return (f"could not check the preservation anchors for synonyms of their concepts "
                f"({type(exc).__name__}: {exc})",)


class _Rejected(Exception):
    """The validator refused a candidate snapshot."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Transient(PolicyError):
    """A reload that failed for a reason other than the policy's content: retried."""


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
    # a change that failed for a reason other than its content and waits for a retry
    pending: bool = False
    pending_since: float | None = None
    retries: int = 0


@dataclass(frozen=True)
class ReloadEvent:
    """What one reload did. ``snapshot`` is the live snapshot after it (the old one after a failure)."""

    result: Literal["success", "failure", "unchanged"]
    snapshot: PolicySnapshot
    error: PolicyError | None = None


Listener = Callable[[ReloadEvent], None]


class PolicyStore:
    """A live policy. Read ``store.current`` once per generation.

    ``watch=True`` watches, in a daemon thread, the folders of the policy file and of every
    file it ever included (folders, so rename and symlink swaps are seen) and reloads when
    their content changes; ``watch="poll"`` polls every ``poll_interval`` seconds instead
    (file systems without change events, e.g. NFS). Either way the watcher only swaps
    content that stayed unchanged for ``settle`` seconds (default ``DEFAULT_SETTLE_S``, 0.5).

    ``roots``: extra folders includes may resolve into (besides the policy's own folder).
    ``validate``: called with every candidate snapshot (at construction and before every
    swap); if it raises, construction raises that error and a reload fails (counted, the
    last good snapshot stays live). ``cache_dir``: the embedding cache (None: default
    folder, False: off).
    """

    def __init__(
        self,
        source: PolicySource,
        *,
        watch: bool | Literal["poll"] = False,
        embedder: Embedder | None = None,
        poll_interval: float = 0.5,
        roots: Roots | None = None,
        validate: Validator | None = None,
        settle: float | None = None,
        cache_dir: CacheDir = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        settle = DEFAULT_SETTLE_S if settle is None else settle
        if settle < 0:
            raise ValueError("settle must be >= 0 seconds")
        if watch not in (None, False, True, "poll"):
            raise ValueError(f"watch must be True, False or 'poll', not {watch!r}")
        if watch and not isinstance(source, (str, os.PathLike)):
            raise ValueError("watch=True needs a policy file to watch, not a dict or Policy object")
        if validate is not None and not callable(validate):
            raise ValueError("validate must be callable (it receives the candidate PolicySnapshot)")
        self._source = source
        self._embedder = embedder
        self._poll_interval = poll_interval
        self._roots = _as_roots(roots)
        self._validate = validate
        self._settle = settle
        self._cache_dir = cache_dir
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watched: dict[str, None] = {}  # ordered set of absolute paths
        self._retry: threading.Timer | None = None
        seen: list[str] = []
        digests: dict[str, str] = {}
        flat = read_policy(source, files=seen, roots=self._roots, digests=digests)
        self._current = _compile(flat, embedder, cache_dir=cache_dir)
        if validate is not None:
            validate(self._current)  # at start-up the validator's own error is the clearest
        self._remember(seen)
        self._fingerprint = self._fingerprints(digests)
        self._state = ReloadState(ok_count=1, last_success_at=self._current.loaded_at,
                                  last_attempt_at=self._current.loaded_at, last_result="success")
        log.info("policy %r loaded from %s: %d concepts, %d merged", self._current.name, self._current.source,
                 len(self._current.concepts), len(self._current.merges))
        if watch:
            # Last: nothing is started before construction can no longer fail.
            if watch is True:
                _quiet_dependency_loggers()
            thread = threading.Thread(target=self._run, args=(watch,), name="gie-guard-policy-watch", daemon=True)
            try:
                thread.start()
            except BaseException:
                self._stop.set()
                raise
            self._thread = thread

    @property
    def current(self) -> PolicySnapshot:
        """The snapshot in use (swapped whole on a successful reload)."""
        return self._current

    @property
    def state(self) -> ReloadState:
        """Counters and the last result of its loads and reloads."""
        return self._state

    @property
    def watching(self) -> bool:
        """Whether the watcher thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def watched_files(self) -> tuple[str, ...]:
        """Absolute paths the watcher compares: the policy file and every file it ever included."""
        return tuple(self._watched)

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
        return bool(self._reload(None))

    def _reload(self, expected: dict[str, tuple[str, ...]] | None) -> bool | None:
        """One reload. With ``expected`` (the watcher's settled fingerprints), a read that saw
        other bytes than those returns None without counting: the watcher settles again."""
        with self._lock:
            started = time.time()
            seen: list[str] = []
            digests: dict[str, str] = {}
            error: PolicyError | None = None
            result: Literal["success", "failure", "unchanged"] = "failure"
            flat: FlatPolicy | None = None
            try:
                flat = read_policy(self._source, files=seen, roots=self._roots, digests=digests)
            except PolicyError as exc:
                error = exc
            except Exception as exc:  # a reload must never take the service down
                log.exception("unexpected error while reading policy %r", self._current.name)
                error = _Transient(f"unexpected {type(exc).__name__} while reading the policy (details in the log)",
                                   file=self._label())
            self._remember(seen)
            fingerprint = self._fingerprints(digests)
            if expected is not None and fingerprint != expected:
                return None
            if flat is not None:
                try:
                    digest = content_hash(flat.policy, expand_concepts(flat.policy))
                    if digest == self._current.content_hash:
                        result = "unchanged"
                    else:
                        candidate = _compile(flat, self._embedder, digest, cache_dir=self._cache_dir)
                        self._refuse_emptying(candidate)
                        self._check(candidate)
                        self._current = candidate
                        result = "success"
                except _Rejected as exc:
                    cause = exc.cause
                    # the validator's PolicyError is about the content; anything else broke meanwhile
                    error = cause if isinstance(cause, PolicyError) else _Transient(
                        f"refused by the validator ({type(cause).__name__}: {cause}); retrying", file=flat.source)
                    if error is not cause:
                        error.__cause__ = cause
                except PolicyError as exc:
                    error = exc
                except Exception as exc:
                    log.exception("unexpected error while compiling policy %r", self._current.name)
                    error = _Transient(f"unexpected {type(exc).__name__} while compiling the policy (details in the "
                                       "log); retrying", file=flat.source)
            self._fingerprint = fingerprint
            self._state = self._counted(result, error, started)
            self._schedule_retry(isinstance(error, (_Transient, EmbeddingUnavailable)))
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

    def _refuse_emptying(self, candidate: PolicySnapshot) -> None:
        """A policy with concepts is replaced by one with none only when the new one says so."""
        if not candidate.concepts and self._current.concepts and not candidate.policy.allow_empty:
            raise PolicyError(
                f"this policy has no concepts to apply, and would replace a live policy with "
                f"{len(self._current.concepts)}; write 'allow_empty: true' if erasing nothing is intended",
                file=candidate.source, place="concepts",
            )

    def _schedule_retry(self, transient: bool) -> None:
        """After a transient failure, reload again later (backoff); otherwise stop retrying.
        Called with the lock held."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        s = self._state
        if not transient:
            if s.pending:
                self._state = replace(s, pending=False, pending_since=None, retries=0)
            return
        retries = s.retries + 1 if s.pending else 0
        self._state = replace(s, pending=True, pending_since=s.pending_since if s.pending else time.time(),
                              retries=retries)
        if self._stop.is_set():
            return
        delay = RETRY_DELAYS_S[min(retries, len(RETRY_DELAYS_S) - 1)]
        timer = threading.Timer(delay, self._retry_now)
        timer.daemon = True
        timer.name = "gie-guard-policy-retry"
        self._retry = timer
        timer.start()

    def _retry_now(self) -> None:
        if not self._stop.is_set() and self._state.pending:
            log.info("retrying the reload of policy %r after a failure that was not its content", self._current.name)
            self._reload(None)

    def _check(self, candidate: PolicySnapshot) -> None:
        if self._validate is None:
            return
        try:
            self._validate(candidate)
        except Exception as exc:
            raise _Rejected(exc) from exc

    def _label(self) -> str | None:
        return os.fspath(self._source) if isinstance(self._source, (str, os.PathLike)) else None

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
        with self._lock:
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> PolicyStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- watching ---------------------------------------------------------------------

    def _remember(self, seen: list[str]) -> None:
        for path in seen:
            self._watched[os.path.abspath(path)] = None
        if len(self._watched) > _MAX_WATCHED:
            keep = {os.path.abspath(p) for p in seen}
            for path in [p for p in self._watched if p not in keep][: len(self._watched) - _MAX_WATCHED]:
                del self._watched[path]

    def _fingerprints(self, digests: dict[str, str]) -> dict[str, tuple[str, ...]]:
        """Per watched file: the sha256 of the bytes just parsed (if read), else what is there now."""
        parsed = {os.path.abspath(p): ("file", d) for p, d in digests.items()}
        return {p: parsed.get(p) or file_fingerprint(p, limit=MAX_POLICY_BYTES) for p in list(self._watched)}

    def _run(self, mode: bool | str) -> None:
        """The watcher thread: never exits while the store is open."""
        warned = False
        while not self._stop.is_set():
            try:
                if mode == "poll":
                    self._poll(None)
                    continue
                try:
                    import watchfiles
                except ImportError:
                    log.warning("watchfiles is not installed; polling the policy files every %.2fs", self._poll_interval)
                    mode = "poll"
                    continue
                self._watch_once(watchfiles)
            except Exception as exc:
                if self._stop.is_set():
                    return
                (log.debug if warned else log.warning)(
                    "cannot watch the policy files (%s: %s); polling every %.2fs, watching again in %.0fs",
                    type(exc).__name__, exc, self._poll_interval, _RETRY_WATCH_S)
                warned = True
                try:
                    self._poll(_RETRY_WATCH_S)
                except Exception:  # pragma: no cover - _poll catches per check
                    log.exception("policy poll failed")

    def _poll(self, duration: float | None) -> None:
        until = None if duration is None else time.monotonic() + duration
        while not self._stop.wait(self._poll_interval):
            self._look()
            if until is not None and time.monotonic() >= until:
                return

    def _look(self) -> None:
        """Reload if some watched file changed, once its content has settled."""
        try:
            now = self._fingerprints({})
            while now != self._fingerprint and not self._stop.is_set():
                if self._settle > 0:
                    if self._stop.wait(self._settle):
                        return
                    again = self._fingerprints({})
                    if again != now:
                        now = again  # still being written
                        continue
                if self._reload(now) is not None:
                    return
                now = self._fingerprints({})  # changed while it was read: settle again
        except Exception:
            log.exception("policy watcher check failed")

    def _folders(self) -> tuple[tuple[str, tuple[int, int] | None], ...]:
        """Folders to watch, with their identity: each watched file's folder (or, while it is
        missing, its nearest existing ancestor, to see it come back) and the folder of the
        file a symlink points to. A folder replaced by another is watched anew."""
        found = set()
        for path in list(self._watched):
            folder = os.path.dirname(path)
            while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
                folder = os.path.dirname(folder)
            found.add(folder)
            real = os.path.dirname(os.path.realpath(path))
            if os.path.isdir(real):
                found.add(real)
        return tuple(sorted((folder, _identity(folder)) for folder in found))

    def _watch_once(self, watchfiles: Any) -> None:
        """Watch the current folders until they change (then return to re-arm) or the store closes."""
        folders = self._folders()
        self._look()
        if self._stop.is_set() or self._folders() != folders:
            return
        quiet_ms = int(min(self._poll_interval * _SAFETY_POLLS, _MAX_QUIET_S) * 1000)
        for _changes in watchfiles.watch(
            *(folder for folder, _ in folders), watch_filter=None, debounce=_DEBOUNCE_MS, step=50,
            stop_event=self._stop, rust_timeout=quiet_ms, yield_on_timeout=True, recursive=False,
            raise_interrupt=False, ignore_permission_denied=True,
        ):
            if self._stop.is_set():
                return
            self._look()
            if self._folders() != folders:
                return  # a folder appeared, vanished or was replaced: watch the new set


def _as_roots(roots: Roots | None) -> tuple[str | os.PathLike[str], ...]:
    if roots is None:
        return ()
    if isinstance(roots, (str, os.PathLike)):
        return (roots,)  # one folder, not the characters of a path
    return tuple(roots)


def _identity(folder: str) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _quiet_dependency_loggers() -> None:
    """watchfiles logs every batch of changes at INFO; keep it at WARNING unless the
    application set a level on its loggers (the root logger is not touched)."""
    parent, main = logging.getLogger("watchfiles"), logging.getLogger("watchfiles.main")
    if parent.level == logging.NOTSET and main.level == logging.NOTSET:
        parent.setLevel(logging.WARNING)
