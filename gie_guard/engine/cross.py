"""Growth inhibitors on a cross-attention layer, around the layer's own processor.

The layer keeps whatever processor it has (fused SDPA, xformers, slicing, fused
projections, an IP-Adapter's two branches), so the prompt's attention runs with the
backend the user chose: the handler only reads the query the processor projects (a forward
hook on ``to_q``) and, just before ``to_out[0]``, subtracts the inhibitor from the attention
output of the rows that carry the prompt. ``to_out[0]`` is affine, so subtracting before it
equals subtracting the paper's inserted columns (eq. 8); an IP-Adapter's image branch is
added before ``to_out[0]`` too and stays as it is.

Only processors whose ``__call__`` is known to project the query once with ``to_q`` and to
feed ``(B, N, heads * d)`` into ``to_out[0]`` once are accepted (by class identity); a
family adds its own (Sana's) by giving :class:`CrossHandler` more classes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch

from . import attention, inhibition
from .concept_stack import ConceptKeys, own_columns, stack_concepts
from .sites import Site, SiteOutcome, SiteState, processor_name

if TYPE_CHECKING:
    from .context import CallShared, StepContext

__all__ = ["CrossHandler", "NormPlace", "diffusers_cross_processors"]

# where a processor applies the layer's q/k norms: "heads" (after splitting heads, as
# AttnProcessor2_0) or "inner" (before, as Sana's)
NormPlace = Literal["heads", "inner"]

_DIFFUSERS: dict[type, NormPlace] | None = None  # filled on first use (importing diffusers is slow)


def diffusers_cross_processors() -> dict[type, NormPlace]:
    """diffusers' generic cross-attention processors this handler guards around."""
    global _DIFFUSERS
    if _DIFFUSERS is None:
        from diffusers.models import attention_processor as ap

        names = ("AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "XFormersAttnProcessor",
                 "FusedAttnProcessor2_0", "IPAdapterAttnProcessor", "IPAdapterAttnProcessor2_0",
                 "IPAdapterXFormersAttnProcessor")
        _DIFFUSERS = {getattr(ap, n): "heads" for n in names if hasattr(ap, n)}
    return _DIFFUSERS


class CrossHandler:
    """Guards cross-attention layers whose processor is one of ``processors`` (default:
    diffusers' generic ones) plus ``extra`` (a family's own)."""

    def __init__(self, extra: Callable[[], dict[type, NormPlace]] | None = None) -> None:
        self._extra = extra
        self._classes: dict[type, NormPlace] | None = None

    def norm_place(self, processor: Any) -> NormPlace | None:
        if self._classes is None:
            self._classes = {**diffusers_cross_processors(), **(self._extra() if self._extra else {})}
        return self._classes.get(type(processor))

    def refusal(self, site: Site) -> str | None:
        if self.norm_place(site.module.processor) is not None:
            return None
        return (f"its processor {processor_name(site.module.processor)} is not one gie_guard can reproduce "
                "(custom processors are refused; reset with set_default_attn_processor())")

    def install(self, site: Site, shared: CallShared, report: Callable[[SiteOutcome], None]) -> CrossSite:
        installed = CrossSite(self, site, shared, report)
        installed.install()
        return installed


class CrossSite:
    """The hooks on one cross-attention layer for one call."""

    def __init__(self, handler: CrossHandler, site: Site, shared: CallShared, report: Callable[[SiteOutcome], None]) -> None:
        self.handler = handler
        self.site = site
        self.shared = shared
        self.report = report
        self.attn = site.module
        self.processor = site.module.processor  # as installed: a different one later is foreign
        self.prompt_sink = shared.sink == "prompt"
        self.query: torch.Tensor | None = None  # (B, N, inner) from to_q, until to_out[0] consumes it
        self.key: torch.Tensor | None = None  # (B, T, inner) the prompt's keys (prompt sink only)
        self.mask: torch.Tensor | None = None  # the prompt's attention mask as passed to the layer
        self.concepts: ConceptKeys | None = None  # static text: projected once per call
        self.references: inhibition.ReferenceKeys | None = None
        # output maps: each concept's and each reference's mean own-token value, (C | R, h, d)
        self.output_means: tuple[torch.Tensor, torch.Tensor] | None = None
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
        self.concepts = self.references = None
        self.output_means = None

    def state(self) -> SiteState:
        processor = self.attn.processor
        if processor is self.processor:
            return "ours"
        return "foreign" if self.handler.norm_place(processor) is not None else "broken"

    def processor_name(self) -> str:
        return processor_name(self.attn.processor)

    # -- hooks -------------------------------------------------------------------------------
    def _wanted(self) -> StepContext | None:
        ctx = self.shared.context()
        return ctx if ctx is not None and ctx.wants_query else None

    def _on_layer(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._wanted() is not None:
            self.mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)

    def _on_key(self, _module: Any, _args: Any, output: torch.Tensor) -> None:
        if self._wanted() is not None:
            self.key = output

    def _on_query(self, _module: Any, _args: Any, output: torch.Tensor) -> None:
        if self._wanted() is not None:
            self.query = output

    def _on_output(self, _module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        # take what the processor projected before computing concept keys (to_k runs again then)
        query, key, mask = self.query, self.key, self.mask
        self.query = self.key = self.mask = None
        ctx = self._wanted()
        if ctx is None:
            return None
        if query is None:
            self.shared.fail(f"attention layer {self.site.name} reached to_out without projecting a query with to_q")
        started = time.perf_counter()
        out = args[0]  # (B, N, heads * d)
        rows = ctx.rows
        q = self._heads(query[rows], self.attn.norm_q)  # (Bc, h, N, d)
        concepts = self._concepts(q.dtype)
        scale = self.attn.scale
        sink = self._prompt_lse(q, key, mask, rows, scale) if self.prompt_sink else None
        gates = self._output_gates(out[rows]) if ctx.inhibit and self.shared.plan.concept_map == "output" else None
        try:
            result = inhibition.act(q, concepts, ctx, self.shared.plan, scale=scale, sink_lse=sink,
                                    references=self.references, gates=gates)
        except ValueError as error:
            self.shared.fail(str(error))
        nonzero = None
        if result.delta is not None:
            b, h, n, d = result.delta.shape
            delta = result.delta.transpose(1, 2).reshape(b, n, h * d).to(out.dtype)
            out[rows] -= delta
            nonzero = delta.ne(0).any()
        self.key = self.mask = None  # to_k ran on the concepts' text meanwhile
        self.report(SiteOutcome(self.site, inhibited=result.delta is not None, nonzero=nonzero,
                                measured=result.measured, maps=result.maps, seconds=time.perf_counter() - started))
        return (out, *args[1:])

    # -- maths -------------------------------------------------------------------------------
    def _output_gates(self, out: torch.Tensor) -> list[torch.Tensor]:
        """Output-space saliency on a cross-attention layer: per concept ``(B_rows, N)``, True
        where the pixel's attention output (before ``to_out``) is nearer, by dot product over
        heads and features, the concept's mean own-token value than every reference's. A
        concept's value is the output of a pixel that read only the concept (ConceptAttention's
        concept output, for tokens that do not attend themselves). ``out`` ``(B_rows, N, inner)``."""
        assert self.output_means is not None, "output maps need the references' values"
        concept_means, reference_means = self.output_means
        o = self._heads(out, None).float()  # (B_rows, h, N, d)
        best_reference = torch.einsum("bhnd,rhd->bnr", o, reference_means.float()).amax(dim=-1)
        scores = torch.einsum("bhnd,chd->bnc", o, concept_means.float())
        return list((scores > best_reference[..., None]).unbind(dim=-1))

    def _heads(self, x: torch.Tensor, norm: Any) -> torch.Tensor:
        """(B, S, inner) -> (B, h, S, d) with the layer's norm where its processor applies it."""
        return attention.split_heads(x, self.attn.heads, norm, self.handler.norm_place(self.attn.processor) or "heads")

    def _prompt_lse(self, q: torch.Tensor, key: torch.Tensor | None, mask: torch.Tensor | None, rows: Any,
                    scale: float) -> torch.Tensor:
        """log of each query's normaliser in the prompt's own (masked) softmax: (Bc, h, N)."""
        if key is None:
            self.shared.fail(f"attention layer {self.site.name} did not project its text keys with to_k")
        return attention.masked_lse(q, self._heads(key[rows], self.attn.norm_k), None if mask is None else mask[rows],
                                    scale=scale)

    def _concepts(self, dtype: torch.dtype) -> ConceptKeys:
        """The concepts' keys and values at this layer. With the paper's own-softmax rule keys
        over every slot of the concept's encoding; with the prompt as the sink only its own
        tokens (the columns eq. 8 inserts); values only at own tokens (the only slots with a
        scale). The text is the same all call: projected once."""
        if self.concepts is None:
            plan = self.shared.plan
            text = self.shared.site_text
            assert text is not None  # sites run only when the plan has concepts
            normed = self._normed(text.states)
            k = self._heads(self._keys(normed), self.attn.norm_k)  # (C, h, S, d) over text.slots
            keys: list[torch.Tensor] | torch.Tensor
            if self.prompt_sink:
                slots = [list(p) for p in plan.token_positions]
                keys = [k[c][:, text.columns(s)].to(dtype) for c, s in enumerate(slots)]
            else:  # every concept over every slot: one shared list (own_columns looks it up once)
                slots = [list(text.slots)] * k.shape[0]
                keys = k.to(dtype)
            own = [text.columns([s[i] for i in cols]) for s, cols in zip(slots, own_columns(plan, slots))]
            values = self._own_values(normed, own, dtype)
            anchor_keys: list[torch.Tensor] = []
            anchor_values: list[torch.Tensor] = []
            anchors = self.shared.anchor_text
            if anchors is not None:  # anchors: their own tokens only
                normed_a = self._normed(anchors.states)
                cols_a = [anchors.columns(p) for p in plan.anchor_positions]
                anchor_keys = [self._heads(self._keys(normed_a[a, c][None]), self.attn.norm_k)[0].to(dtype)
                               for a, c in enumerate(cols_a)]
                anchor_values = self._own_values(normed_a, cols_a, dtype)
            competing, spared = inhibition.anchor_effects(plan, values, anchor_keys, anchor_values)
            self.concepts = stack_concepts(plan, keys, spared, slots, competing)
            references = self.shared.reference_text
            if references is not None:  # over the same kind of slots as the concepts'
                normed_r = self._normed(references.states)
                kr = self._heads(self._keys(normed_r), self.attn.norm_k)
                own_r = [references.columns(p) for p in plan.reference_positions]
                if plan.concept_map == "output":  # the concepts' own values as they are, anchors aside
                    self.output_means = (torch.stack([v.mean(dim=-2) for v in values]),
                                         torch.stack([v.mean(dim=-2) for v in self._own_values(normed_r, own_r, dtype)]))
                if self.prompt_sink:  # keys over their own tokens: every column is their own
                    self.references = inhibition.ReferenceKeys(
                        keys=[kr[r][:, o].to(dtype) for r, o in enumerate(own_r)], own=[list(range(len(o))) for o in own_r])
                else:
                    self.references = inhibition.ReferenceKeys(keys=[kr[r].to(dtype) for r in range(kr.shape[0])],
                                                               own=own_r)
        return self.concepts

    def _normed(self, text: torch.Tensor) -> torch.Tensor:
        """(C, T, D) text as this layer's projections receive it (its cross norm, if any, sees
        the whole text: a group norm is not per token)."""
        weight = self.attn.to_k.weight if getattr(self.attn, "to_k", None) is not None else self.attn.to_kv.weight
        text = text.to(device=weight.device, dtype=weight.dtype)
        return self.attn.norm_encoder_hidden_states(text) if getattr(self.attn, "norm_cross", None) else text

    def _keys(self, text: torch.Tensor) -> torch.Tensor:
        """(..., T, D) normed text -> (..., T, inner) keys, before the layer's key norm."""
        attn = self.attn
        if getattr(attn, "to_k", None) is not None:
            return attn.to_k(text)  # type: ignore[no-any-return]
        return attn.to_kv(text).chunk(2, dim=-1)[0]  # type: ignore[no-any-return]  # fused projections only

    def _values(self, text: torch.Tensor) -> torch.Tensor:
        """(..., T, D) normed text -> (..., h, T, d) values."""
        attn = self.attn
        v = attn.to_v(text) if getattr(attn, "to_v", None) is not None else attn.to_kv(text).chunk(2, dim=-1)[1]
        return self._heads(v if v.ndim == 3 else v[None], None)

    def _own_values(self, normed: torch.Tensor, own: list[list[int]], dtype: torch.dtype) -> list[torch.Tensor]:
        """Per concept the values of its own columns ``own[c]`` of ``normed`` (C, S, D):
        ``(h, n_c, d)``, projected in one product."""
        width = max(1, max(len(cols) for cols in own))
        index = torch.tensor([cols + [0] * (width - len(cols)) for cols in own], device=normed.device)  # (C, n)
        v = self._values(normed[torch.arange(len(own), device=normed.device)[:, None], index])  # (C, h, n, d)
        return [v[c, :, : len(cols)].to(dtype) for c, cols in enumerate(own)]
