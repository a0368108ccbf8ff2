"""Attention sites and the handlers that guard them.

A *site* is one attention layer the concepts act on. A *handler* knows one kind of site
(cross-attention around the layer's own processor, a joint-attention block, ...): whether a
site's current processor can be guarded, how to install the inhibitor there for one call
and how to take it off again. Families supply their handlers (``Family.site_handlers``);
the coordinator (coordinator.py) iterates them without knowing kinds or family names.

What a site did in a denoiser call comes back as a :class:`SiteOutcome` through the
``report`` callback the coordinator gives at install: sites never write the call's state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

if TYPE_CHECKING:
    from .context import CallShared

__all__ = ["InstalledSite", "Site", "SiteHandler", "SiteKind", "SiteOutcome", "SiteState"]

# Names of site kinds; open: a family that brings a new kind of attention names it and
# supplies its handler. Built in: "cross" (a cross-attention layer over text states that do
# not change within a call: UNet attn2, PixArt/Sana attn2), "joint" (a joint-attention block
# over [image; text] whose text stream changes from block to block: SD3, Flux double-stream),
# "single" (a Flux single-stream block: one projection for text and image, no to_out).
SiteKind = str


@dataclass(frozen=True, eq=False)
class Site:
    """One attention layer the concepts act on."""

    name: str  # module path inside the denoiser, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    # a diffusers Attention (torch.nn.Module); diffusers is read untyped, and handlers read
    # its processor, projections and norms by name
    module: Any
    kind: SiteKind
    block: int | None = None  # transformer block index, for calls that skip blocks (SD3 skip-layer guidance)


@dataclass(frozen=True)
class SiteOutcome:
    """What one site did in one attention call of a denoiser call."""

    site: Site
    inhibited: bool  # the inhibitor was subtracted
    # device-side bool: some subtracted value was non-zero in the output's dtype (a scale that
    # float16 flushes to zero is no inhibition); read once per denoiser call
    nonzero: torch.Tensor | None = None
    measured: torch.Tensor | None = None  # (rows, C, T) first-step maps over the plan's slots
    maps: list[torch.Tensor] | None = None  # per concept (rows, heads, N): share on its own tokens
    seconds: float = 0.0


# After install, a site's processor is "ours" (as installed), "foreign" (other code replaced
# it with one the handler still guards: reported, never undone) or "broken" (it cannot be
# guarded any more: the call fails).
SiteState = Literal["ours", "foreign", "broken"]


class InstalledSite(Protocol):
    site: Site

    def state(self) -> SiteState: ...

    def processor_name(self) -> str: ...

    def remove(self) -> None:
        """Take everything off again (a processor other code installed meanwhile stays)."""
        ...


class SiteHandler(Protocol):
    """Guards one kind of attention site."""

    def refusal(self, site: Site) -> str | None:
        """Why this site, as it is now, cannot be guarded (None: it can)."""
        ...

    def install(self, site: Site, shared: CallShared, report: Callable[[SiteOutcome], None]) -> InstalledSite:
        """Install the inhibitor on ``site`` for one call."""
        ...


def processor_name(processor: Any) -> str:
    return f"{type(processor).__module__}.{type(processor).__qualname__}"
