"""The growth-inhibitor cross-attention processor (GIE, eq. 6-8, additive form).

For a cross-attention layer with image queries ``Q`` and a concept encoding ``E_c``::

    M_c = softmax(Q K_c^T / sqrt(d)),  K_c = to_k(E_c), V_c = to_v(E_c)   (its own softmax)
    O'  = M_p V_p - sum_j w_j * M_c[..., j] (outer) V_c[j]

summed over concepts, with ``w_j = 0`` on the concept's start, end and padding slots. The
sum over ``j`` is ``M_c @ (w * V_c)``, so each concept's inhibitor is one scaled-dot-product
attention with scaled values; all concepts run as one batched attention over ``(C, T)`` keys.
The additive form equals the paper's insertion of negative maps before the end token, but
needs no token slots, so a prompt that fills every slot loses nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import GuardedCallError, UnsupportedPipelineError

# Processors whose cross-attention is plain softmax attention, so that computing the
# layer ourselves inside the step window gives the same function. Anything else (IP-Adapter,
# custom processors) would be silently replaced, so it is refused instead.
_PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "XFormersAttnProcessor")


@dataclass(eq=False)
class CallState:
    """Mutable state of one guarded call, shared by its processors and its step hook."""

    embeddings: torch.Tensor  # (C, T, D) concept encodings on the UNet's device and dtype
    token_scales: torch.Tensor  # (C, T) w per token slot, 0 on special tokens
    window_start: float
    window_end: float
    step: int = -1  # index of the denoising step in progress (one UNet call each)
    total_steps: int | None = None
    classifier_free_guidance: bool = True
    active: bool = False  # inhibit during this step
    measure_first_step: bool = True  # record the concepts' attention at step 0 (adapter features)
    probing: bool = False  # an extra UNet evaluation (adapter probe pass) is running: not a step
    steps_inhibited: list[int] = field(default_factory=list)
    inhibitor_seconds: float = 0.0
    # per layer: concept keys and values, (C, heads, T, head_dim) each; computed once per call
    concept_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # per layer, at step 0: mean of each concept's attention map over heads, pixels and the
    # conditional rows, (C, T); the adapter's features and the metrics' "measured attention"
    first_step_attention: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def measuring(self) -> bool:
        return self.measure_first_step and self.step == 0

    def begin_step(self, total_steps: int, classifier_free_guidance: bool) -> None:
        self.step += 1
        self.total_steps = total_steps
        self.classifier_free_guidance = classifier_free_guidance
        n = total_steps
        self.active = self.window_start * n <= self.step < self.window_end * n
        if self.active:
            self.steps_inhibited.append(self.step)

    def conditional_rows(self, batch_size: int) -> slice:
        """Rows of the UNet batch that carry the prompt. With classifier-free guidance the
        pipelines stack ``[unconditional; conditional]``, so the second half."""
        if not self.classifier_free_guidance:
            return slice(0, batch_size)
        if batch_size % 2:
            raise GuardedCallError(
                f"classifier-free guidance is on but the UNet batch has odd size {batch_size}; "
                "cannot tell conditional rows from unconditional ones"
            )
        return slice(batch_size // 2, batch_size)


def check_processor_supported(layer_name: str, processor: Any) -> None:
    if type(processor).__name__ not in _PLAIN_PROCESSORS:
        raise UnsupportedPipelineError(
            f"cannot guard cross-attention layer {layer_name}: its processor "
            f"{type(processor).__module__}.{type(processor).__qualname__} is not one gie_guard can "
            f"reproduce ({', '.join(_PLAIN_PROCESSORS)}); remove it or reset with "
            "unet.set_default_attn_processor()"
        )


class GrowthInhibitorProcessor:
    """Cross-attention processor that subtracts the concepts' growth inhibitors from the
    conditional rows during the step window; outside it, the layer's own processor runs."""

    def __init__(self, original: Any, layer_name: str, state: CallState) -> None:
        check_processor_supported(layer_name, original)
        self.original = original
        self.layer_name = layer_name
        self.state = state
        # honour attention slicing: bound the memory of both attentions by this many (batch x head) rows
        self.slice_size = getattr(original, "slice_size", None)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        state = self.state
        if encoder_hidden_states is None or not (state.active or state.measuring):
            return self._original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, args, kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        heads = attn.heads
        head_dim = attn.to_k.out_features // heads
        # (B, N, heads * d) -> (B, heads, N, d)
        query = attn.to_q(hidden_states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        rows = state.conditional_rows(batch_size)
        if state.measuring:
            started = time.perf_counter()
            state.first_step_attention[self.layer_name] = self._mean_concept_maps(attn, query[rows], heads, head_dim)
            state.inhibitor_seconds += time.perf_counter() - started
        if not state.active:
            return self._original(attn, residual, encoder_hidden_states, attention_mask, temb, args, kwargs)

        text_len = encoder_hidden_states.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text_len, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
        value = attn.to_v(encoder_hidden_states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = self._attend(query, key, value, attention_mask, attn.scale)  # (B, heads, N, d)
        started = time.perf_counter()
        out[rows] -= self._inhibitor(attn, query[rows], heads, head_dim)
        state.inhibitor_seconds += time.perf_counter() - started

        out = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _original(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, args, kwargs):
        extra = {"temb": temb} if temb is not None else {}  # SlicedAttnProcessor takes no temb
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **extra, **kwargs)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """Softmax attention, (B, heads, N, d); in chunks of ``slice_size`` (batch x head) rows
        when the pipeline asked for attention slicing."""
        if not self.slice_size:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        b, h, n, d = query.shape
        q, k, v = (t.reshape(b * h, t.shape[2], t.shape[3]) for t in (query, key, value))
        m = None if mask is None else mask.expand(b, h, n, mask.shape[-1]).reshape(b * h, n, -1)
        out = torch.empty_like(q[..., : v.shape[-1]])
        for i in range(0, b * h, self.slice_size):
            j = slice(i, i + self.slice_size)
            out[j] = F.scaled_dot_product_attention(q[j], k[j], v[j], attn_mask=None if m is None else m[j], scale=scale)
        return out.view(b, h, n, -1)

    def _concept_kv(self, attn: Any, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self.state.concept_kv.get(self.layer_name)
        if cached is None:
            weight = attn.to_k.weight  # with model offloading the layer's device is only known now
            embeds = self.state.embeddings.to(device=weight.device, dtype=weight.dtype)  # (C, T, D)
            if attn.norm_cross:
                embeds = attn.norm_encoder_hidden_states(embeds)
            c, t, _ = embeds.shape
            k = attn.to_k(embeds).view(c, t, heads, head_dim).transpose(1, 2)  # (C, heads, T, d)
            v = attn.to_v(embeds).view(c, t, heads, head_dim).transpose(1, 2)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            cached = (k, v)
            self.state.concept_kv[self.layer_name] = cached
        return cached

    def _mean_concept_maps(self, attn: Any, query: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        """Mean of softmax(Q K_c^T) over conditional rows, heads and pixels: (C, T)."""
        k, _ = self._concept_kv(attn, heads, head_dim)
        means = []
        for kc in k:  # one concept at a time bounds memory to (Bc, heads, N, T)
            maps = torch.softmax((query @ kc.transpose(-1, -2)).float() * attn.scale, dim=-1)
            means.append(maps.mean(dim=(0, 1, 2)))
        return torch.stack(means)

    def _inhibitor(self, attn: Any, query: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        """sum_c M_c @ (w_c * V_c) for the conditional queries ``(Bc, heads, N, d)``."""
        k, v = self._concept_kv(attn, heads, head_dim)
        scales = self.state.token_scales.to(device=v.device, dtype=v.dtype)  # (C, T)
        v = v * scales[:, None, :, None]  # zero rows on start/end/padding slots
        c = k.shape[0]
        bc, _, n, _ = query.shape
        # each concept keeps its own softmax: fold concepts into the head axis, (Bc, C*heads, ., d)
        step = c if not self.slice_size else max(1, self.slice_size // max(1, bc * heads))
        total = torch.zeros_like(query)
        for lo in range(0, c, step):
            kc, vc = k[lo : lo + step], v[lo : lo + step]
            cc = kc.shape[0]
            q = query.repeat(1, cc, 1, 1)
            kk = kc.reshape(1, cc * heads, -1, head_dim).expand(bc, -1, -1, -1)
            vv = vc.reshape(1, cc * heads, -1, head_dim).expand(bc, -1, -1, -1)
            delta = F.scaled_dot_product_attention(q, kk, vv, scale=attn.scale)  # (Bc, cc*heads, N, d)
            total += delta.view(bc, cc, heads, n, head_dim).sum(1)
        return total
