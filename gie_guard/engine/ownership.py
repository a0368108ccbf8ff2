"""Ownership of a denoiser: once a Guard wraps or attaches a pipeline, its denoiser (and its
ControlNets) run only inside guarded calls, whichever pipeline object or code calls them.

The rule lives on the model, not on the pipeline object, so every way of reaching the model
is covered at once: ``from_pipe``, ``Pipeline(**pipe.components)``, AutoPipeline, copies, a
hand-written denoising loop calling ``pipe.unet(...)`` or ``pipe.unet.forward(...)``.

How: two checks, each raising ``UnguardedUseError`` unless this thread is inside a guarded
call of that very module (``inside``): a forward pre-hook, first in line (``module(...)``,
whatever other libraries do to ``forward``: accelerate's offload hooks replace and restore
it), and the module's ``forward`` replaced on the instance (``module.forward(...)`` runs no
hooks). A deep copy of an owned module copies its owners and both checks (the copy is owned
by the same guards; a closed guard owns nothing anywhere).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ..errors import UnguardedUseError

__all__ = ["Owner", "inside", "is_owned", "own", "owners_of", "release"]

_OWNERS_ATTR = "_gie_guard_owners"
_LOCK = threading.Lock()
_EVER_OWNED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # for the test suite's clean-up only
_INSIDE = threading.local()  # .counts: {id(module): depth} of guarded calls in this thread


class Owner:
    """One guard's claim. ``closed`` (a closed guard) drops it from every module at once,
    copies included. Copying an owner returns the owner itself: it is an identity."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def __copy__(self) -> Owner:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Owner:
        return self

    def __repr__(self) -> str:
        return f"Owner({self.label!r}{', closed' if self.closed else ''})"


class _Claims:
    """The owners of one module: ``{owner: claims}``. A deep copy of the module gets its own
    table with the same owners."""

    def __init__(self, counts: dict[Owner, int] | None = None) -> None:
        self.counts: dict[Owner, int] = counts or {}

    def live(self) -> list[Owner]:
        return [o for o, n in self.counts.items() if n > 0 and not o.closed]

    def __deepcopy__(self, memo: dict[int, Any]) -> _Claims:
        return _Claims(dict(self.counts))

    def __copy__(self) -> _Claims:
        return _Claims(dict(self.counts))

    def __reduce__(self) -> tuple[Any, ...]:
        # a model saved and loaded again (torch.save, pickle) is a new model: nobody owns it
        return (_Claims, ())


def _claims(module: torch.nn.Module) -> _Claims | None:
    found = module.__dict__.get(_OWNERS_ATTR)
    return found if isinstance(found, _Claims) else None


def _refuse_outside_guarded_calls(module: torch.nn.Module) -> None:
    claims = _claims(module)
    if claims is not None and claims.live() and not _inside_count(module):
        owners = ", ".join(sorted({o.label for o in claims.live()}))
        raise UnguardedUseError(
            f"{type(module).__name__} is owned by {owners}: it runs only inside guarded calls, and this call "
            "was not one (a pipeline made with from_pipe or **components, a copy, or code calling the model "
            "directly). Call it through the guard (guard.wrap(pipeline)), or release it first "
            "(guard.release(pipeline)); nothing was generated"
        )


def _check_hook(module: torch.nn.Module, _args: Any) -> None:
    _refuse_outside_guarded_calls(module)


class _CheckedForward:
    """The owned module's ``forward`` (set on the instance): the check, then the forward it
    replaced (another library's wrapper) or the class's. An object rather than a bound method
    so that a module saved while owned (``torch.save``) loads again, and deep copies rebind."""

    def __init__(self, module: torch.nn.Module, previous: Any) -> None:
        self.module = module
        self.previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        _refuse_outside_guarded_calls(module)
        entered: set[int] = _INSIDE.__dict__.setdefault("forwarding", set())
        if self.previous is None or id(module) in entered:
            # Re-entered through a wrapper that saved this check as the forward it wraps (accelerate's
            # hooks added while the module was owned, the module owned again later): the chain ends here.
            return type(module).forward(module, *args, **kwargs)
        entered.add(id(module))
        try:
            return self.previous(*args, **kwargs)
        finally:
            entered.discard(id(module))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_CheckedForward, (self.module, self.previous))


def _is_ours(value: Any) -> bool:
    return isinstance(value, _CheckedForward)


def own(module: torch.nn.Module, owner: Owner) -> None:
    """Add one claim of ``owner`` on ``module``."""
    with _LOCK:
        claims = _claims(module)
        if claims is None:
            claims = _Claims()
            object.__setattr__(module, _OWNERS_ATTR, claims)
        claims.counts[owner] = claims.counts.get(owner, 0) + 1
        _EVER_OWNED.add(module)
        if _check_hook not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_check_hook, prepend=True)
        current = module.__dict__.get("forward")
        if not _is_ours(current):
            # an instance-level forward set before (accelerate's hooks) is kept and called after the check
            object.__setattr__(module, "forward", _CheckedForward(module, current))


def release(module: torch.nn.Module, owner: Owner) -> None:
    """Drop every claim of ``owner`` on ``module``. With no claim left, the module's own
    ``forward`` is restored where nothing was installed on top of the check since."""
    with _LOCK:
        claims = _claims(module)
        if claims is None:
            return
        claims.counts.pop(owner, None)
        claims.counts = {o: n for o, n in claims.counts.items() if n > 0 and not o.closed}
        if claims.counts:
            return
        del module.__dict__[_OWNERS_ATTR]
        for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _check_hook]:
            del module._forward_pre_hooks[key]
        checked = module.__dict__.get("forward")
        if isinstance(checked, _CheckedForward):
            if checked.previous is None:
                del module.__dict__["forward"]
            else:
                object.__setattr__(module, "forward", checked.previous)
        # else another library wrapped forward on top of the check: it stays, and passes calls through


def is_owned(module: torch.nn.Module) -> bool:
    """Whether some open guard owns ``module``."""
    claims = _claims(module)
    return claims is not None and bool(claims.live())


def owners_of(module: torch.nn.Module) -> tuple[Owner, ...]:
    claims = _claims(module)
    return tuple(claims.live()) if claims is not None else ()


def _inside_count(module: torch.nn.Module) -> int:
    counts: dict[int, int] = getattr(_INSIDE, "counts", {})
    return counts.get(id(module), 0)


@contextlib.contextmanager
def inside(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Within the block, this thread's calls of ``modules`` are guarded calls (the engine has
    installed its machinery, or the plan is empty and there is nothing to install)."""
    counts: dict[int, int] = _INSIDE.__dict__.setdefault("counts", {})
    ids = list(dict.fromkeys(id(m) for m in modules))
    for key in ids:
        counts[key] = counts.get(key, 0) + 1
    try:
        yield
    finally:
        for key in ids:
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]


def _release_everything() -> None:
    """Release every module from every owner. For test isolation only (tests/conftest.py):
    an application releases through its guards."""
    for module in list(_EVER_OWNED):
        claims = _claims(module)
        for owner in list(claims.counts) if claims is not None else ():
            release(module, owner)
