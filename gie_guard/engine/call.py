"""The engine's entry points for one call: ``guarded_call`` (serialised per denoiser,
owned models marked as inside a guarded call, the coordinator installed and taken off) and
``observing`` (hand the maps of every guarded call of a pipeline to an observer).

Calls are serialised per denoiser (and scheduler), not per pipeline object, so pipelines
that share a UNet (``from_pipe``, ``**pipe.components``) never overlap.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import GuardedCallError
from . import ownership
from .coordinator import EngineCall
from .families import family_for
from .plan import Plan
from .record import CallRecord, MapObserver, ScaleSource

__all__ = ["CallRecord", "EngineCall", "MapObserver", "ScaleSource", "denoiser_lock", "guarded_call", "observing"]

_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_OBSERVERS: weakref.WeakKeyDictionary[Any, list[MapObserver]] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_ACTIVE: weakref.WeakKeyDictionary[Any, EngineCall] = weakref.WeakKeyDictionary()


def denoiser_lock(obj: Any) -> threading.RLock:
    """The lock of a denoiser (or scheduler): one guarded call at a time uses it."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(obj)
        if lock is None:
            lock = _LOCKS[obj] = threading.RLock()
        return lock


@contextlib.contextmanager
def _locked(objs: Sequence[Any]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for obj in sorted({id(o): o for o in objs if o is not None}.values(), key=id):  # one global order
            stack.enter_context(denoiser_lock(obj))
        yield


@contextlib.contextmanager
def observing(pipe: Any, observer: MapObserver) -> Iterator[MapObserver]:
    """Within the block, every guarded call of ``pipe`` (by any code) hands its maps to
    ``observer`` too (pictures of calls a Guard makes)."""
    denoiser = family_for(pipe).denoiser(pipe)
    with _LOCKS_GUARD:
        _OBSERVERS.setdefault(denoiser, []).append(observer)
    try:
        yield observer
    finally:
        with _LOCKS_GUARD:
            _OBSERVERS.get(denoiser, []).remove(observer)


@contextlib.contextmanager
def guarded_call(
    pipe: Any,
    plan: Plan,
    *,
    scale_source: ScaleSource | None = None,
    observers: Sequence[MapObserver] = (),
    inhibit: bool = True,
) -> Iterator[CallRecord]:
    """Within the block, ``pipe``'s denoiser runs the plan's growth inhibitors; on a normal
    exit the call's invariants are checked (GuardedCallError withholds the output).
    An empty plan with no observer installs nothing: the call is bit-identical."""
    family = plan.family
    denoiser = family.denoiser(pipe)
    with _LOCKS_GUARD:
        observers = (*observers, *_OBSERVERS.get(denoiser, ()))
    with _locked([denoiser, getattr(pipe, "scheduler", None)]), ownership.inside(family.owned_models(pipe)):
        if plan.is_empty and not observers:
            yield CallRecord(family=family.name, pipeline_class=type(pipe).__name__)
            return
        if _ACTIVE.get(denoiser) is not None:
            raise GuardedCallError(
                f"{type(pipe).__name__}: its {family.denoiser_attr} is already inside a guarded call in this thread "
                "(a guarded call made from within another one)"
            )
        call = EngineCall(pipe, plan, scale_source=scale_source, observers=observers, inhibit=inhibit)
        _ACTIVE[denoiser] = call
        try:
            call.install()
            yield call.record
            call.finish()
        finally:
            call.remove()
            _ACTIVE.pop(denoiser, None)
