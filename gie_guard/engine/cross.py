"""Growth inhibitors on a cross-attention layer, around the layer's own processor.

The layer keeps whatever processor it has (fused SDPA, xformers, slicing, fused
projections, an IP-Adapter's two branches): the engine only reads the query the
processor projects (a forward hook on ``to_q``) and, just before ``to_out[0]``, subtracts
the inhibitor from the attention output of the rows that carry the prompt. ``to_out[0]``
is affine, so subtracting before it equals subtracting the paper's inserted columns
(eq. 8); an IP-Adapter's image branch is added before ``to_out[0]`` too and stays as it is.

Only processors whose ``__call__`` is known to project the query once with ``to_q`` and to
feed ``(B, N, heads * d)`` into ``to_out[0]`` once are accepted (by class identity, see
``CROSS_PROCESSORS``); anything else is refused before the call.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from . import attention

if TYPE_CHECKING:
    from .call import EngineCall
    from .families.base import Site

__all__ = ["CROSS_PROCESSORS", "CrossSite", "cross_processor_classes"]


def cross_processor_classes() -> dict[type, str]:
    """Accepted processor classes -> where they apply ``norm_q`` ("heads": after splitting
    heads, as AttnProcessor2_0; "inner": before, as Sana's)."""
    from diffusers.models import attention_processor as ap

    classes: dict[type, str] = {}
    for name in (
        "AttnProcessor",
        "AttnProcessor2_0",
        "SlicedAttnProcessor",
        "XFormersAttnProcessor",
        "FusedAttnProcessor2_0",
        "IPAdapterAttnProcessor",
        "IPAdapterAttnProcessor2_0",
        "IPAdapterXFormersAttnProcessor",
    ):
        if hasattr(ap, name):
            classes[getattr(ap, name)] = "heads"
    try:
        from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

        classes[SanaAttnProcessor2_0] = "inner"
    except ImportError:  # pragma: no cover - older diffusers
        pass
    return classes


CROSS_PROCESSORS = None  # filled on first use (importing diffusers is slow)


def accepted(processor: Any) -> str | None:
    global CROSS_PROCESSORS
    if CROSS_PROCESSORS is None:
        CROSS_PROCESSORS = cross_processor_classes()
    return CROSS_PROCESSORS.get(type(processor))


class CrossSite:
    """Hooks on one cross-attention layer for one call."""

    def __init__(self, site: Site, call: EngineCall, row: int) -> None:
        self.site = site
        self.call = call
        self.row = row  # this site's index in the plan's sites
        self.attn = site.module
        self.prompt_sink = call.sink == "prompt"
        self.query: torch.Tensor | None = None  # (B, N, inner) from to_q, until to_out[0] consumes it
        self.key: torch.Tensor | None = None  # (B, T, inner) the prompt's keys (prompt sink only)
        self.mask: torch.Tensor | None = None  # the prompt's attention mask as passed to the layer
        self.applied = 0  # inhibitor applications in the current denoiser call
        self.kv: list[tuple[torch.Tensor, torch.Tensor, list[int]]] | None = None  # per concept, per call
        self.anchor_kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per anchor: own tokens' keys, values
        # what the anchors do to each concept, derived once per call from the (static) text:
        self.competing: list[torch.Tensor | None] | None = None  # per concept, anchor keys joining its softmax
        self.spared: list[torch.Tensor] | None = None  # per concept, its values off its anchors' span
        self._handles: list[Any] = []

    def install(self) -> None:
        attn = self.attn
        self._handles.append(attn.to_q.register_forward_hook(self._on_query))
        self._handles.append(attn.to_out[0].register_forward_pre_hook(self._on_output))
        if self.prompt_sink:
            self._handles.append(attn.register_forward_pre_hook(self._on_layer, with_kwargs=True))
            self._handles.append(attn.to_k.register_forward_hook(self._on_key))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.query = self.key = self.mask = None
        self.kv = None
        self.competing = self.spared = None

    # -- hooks -------------------------------------------------------------------------------
    def _on_layer(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.call.wants_query(self.site):
            self.mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)

    def _on_key(self, _module: Any, _args: Any, output: torch.Tensor) -> None:
        if self.call.wants_query(self.site):
            self.key = output

    def _on_query(self, _module: Any, _args: Any, output: torch.Tensor) -> None:
        if self.call.wants_query(self.site):
            self.query = output

    def _on_output(self, _module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        call = self.call
        # take what the processor projected before computing concept keys (to_k runs again then)
        query, key, mask = self.query, self.key, self.mask
        self.query = self.key = self.mask = None
        if not call.wants_query(self.site):
            return None
        if query is None:
            call.fail(f"attention layer {self.site.name} reached to_out without projecting a query with to_q")
        started = time.perf_counter()
        out = args[0]  # (B, N, heads * d)
        rows = call.rows
        q = self._heads(query[rows], self.attn.norm_q)  # (Bc, h, N, d)
        concepts = self._concept_kv(q.dtype)
        scale = self.attn.scale
        sink = self._prompt_lse(q, key, mask, rows, scale) if self.prompt_sink else None
        competing, spared = self._anchor_effects(concepts)
        if call.measuring or call.observing:
            keys = [k for k, _, _ in concepts]
            maps = [attention.concept_maps(q, k, scale=scale, sink_lse=sink, anchor_keys=a) for k, a in zip(keys, competing)]
            if call.measuring:
                # adapters and presence thresholds read the concept's map as if it had no anchors
                plain = attention.maps_without_anchors(q, keys, competing, maps, scale=scale, sink_lse=sink)
                call.measured(self.site, call.to_plan_slots([m.mean(dim=(1, 2)) for m in plain], self.slots))
            if call.observing:  # the share of each pixel's (inhibiting) map on the concept's own tokens
                own = [[i for i, slot in enumerate(slots) if slot in set(call.plan.token_positions[c])]
                       for c, slots in enumerate(self.slots)]
                call.observe(self.site, [m[..., cols].sum(-1) for m, cols in zip(maps, own)])
        if call.active:
            scales = call.scales_for(q.shape[0])
            with_w = [(k, spared[c], scales[..., c, slots], competing[c])
                      for c, (k, _, slots) in enumerate(concepts)]
            delta = attention.inhibitor(q, with_w, scale=scale, sink_lse=sink,
                                        slice_size=getattr(self.attn.processor, "slice_size", None))
            b, h, n, d = delta.shape
            delta = delta.transpose(1, 2).reshape(b, n, h * d).to(out.dtype)
            out[rows] -= delta
            call.subtracted(delta)
            self.applied += 1
        self.key = self.mask = None  # to_k ran on the concepts' text meanwhile
        call.add_seconds(time.perf_counter() - started)
        return (out, *args[1:])

    # -- maths -------------------------------------------------------------------------------
    def _anchor_effects(
        self, concepts: list[tuple[torch.Tensor, torch.Tensor, list[int]]]
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
        """Per concept: the anchors' keys that compete in its softmax and its spared values.
        Both depend only on the call's text, so they are computed at the first step and kept
        (a QR per concept, layer and call instead of per step)."""
        if self.competing is None or self.spared is None:
            self.competing = self._competing(len(concepts))
            self.spared = [self._spare(c, v) for c, (_, v, _) in enumerate(concepts)]
        return self.competing, self.spared

    def _competing(self, count: int) -> list[torch.Tensor | None]:
        """Per concept, its anchors' keys that join its softmax (``preserve`` compete/both)."""
        plan = self.call.plan
        if not self.anchor_kv or plan.preserve == "project":
            return [None] * count
        return [torch.cat([self.anchor_kv[a][0] for a in plan.concept_anchors[c]], dim=1)
                if plan.concept_anchors[c] else None for c in range(count)]

    def _spare(self, concept: int, values: torch.Tensor) -> torch.Tensor:
        """The concept's values without what its anchors' values span (``preserve`` project/both)."""
        plan = self.call.plan
        if not self.anchor_kv or plan.preserve == "compete" or not plan.concept_anchors[concept]:
            return values
        basis = torch.cat([self.anchor_kv[a][1] for a in plan.concept_anchors[concept]], dim=1)
        return attention.project_off(values, basis)

    @property
    def slots(self) -> list[list[int]]:
        assert self.kv is not None
        return [slots for _, _, slots in self.kv]

    def _heads(self, x: torch.Tensor, norm: Any) -> torch.Tensor:
        """(B, S, inner) -> (B, h, S, d) with the layer's norm where its processor applies it."""
        heads = self.attn.heads
        norm_where = accepted(self.attn.processor) or "heads"
        if norm_where == "inner" and norm is not None:
            x = norm(x)
        x = x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)
        if norm_where == "heads" and norm is not None:
            x = norm(x)
        return x

    def _prompt_lse(self, q: torch.Tensor, key: torch.Tensor | None, mask: torch.Tensor | None, rows: Any,
                    scale: float) -> torch.Tensor:
        """log of each query's normaliser in the prompt's own (masked) softmax: (Bc, h, N)."""
        if key is None:
            self.call.fail(f"attention layer {self.site.name} did not project its text keys with to_k")
        k = self._heads(key[rows], self.attn.norm_k)
        logits = (q @ k.transpose(-1, -2)).float() * scale  # (Bc, h, N, T)
        if mask is not None:  # the layer's bias form (0 / -10000 or -inf); a boolean mask keeps True slots
            mask = mask[rows]
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask.float()
            logits = logits + (mask[:, None] if mask.ndim == 3 else mask[:, None, None])
        return torch.logsumexp(logits, dim=-1)

    def _concept_kv(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """Per concept: keys and values (h, T_c, d) and the plan slots they stand for. With the
        paper's own-softmax rule every slot of the concept's encoding; with the prompt as the
        sink only its own tokens (the columns eq. 8 inserts)."""
        if self.kv is None:
            attn = self.attn
            weight = attn.to_k.weight if getattr(attn, "to_k", None) is not None else attn.to_kv.weight
            k, v = self._project_text(self.call.site_text(), weight)  # (C, h, T, d)
            plan = self.call.plan
            kv = []
            for c in range(k.shape[0]):
                slots = list(plan.token_positions[c]) if self.prompt_sink else list(range(k.shape[2]))
                kv.append((k[c][:, slots].to(dtype), v[c][:, slots].to(dtype), slots))
            self.kv = kv
            if plan.anchor_embeddings is not None:  # anchors: their own tokens only
                ka, va = self._project_text(self.call.site_text(anchors=True), weight)
                self.anchor_kv = [(ka[a][:, list(s)].to(dtype), va[a][:, list(s)].to(dtype))
                                  for a, s in enumerate(plan.anchor_positions)]
        return self.kv

    def _project_text(self, text: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, T, D) text -> keys and values (C, h, T, d) as this layer projects text."""
        attn = self.attn
        text = text.to(device=weight.device, dtype=weight.dtype)
        if getattr(attn, "norm_cross", None):
            text = attn.norm_encoder_hidden_states(text)
        if getattr(attn, "to_k", None) is not None:
            k, v = attn.to_k(text), attn.to_v(text)
        else:  # fused projections only
            k, v = attn.to_kv(text).chunk(2, dim=-1)
        return self._heads(k, attn.norm_k), self._heads(v, None)
