"""The transformer (SD3-family) shapes model and `load_dit_pipeline`, which builds it offline.

A real `StableDiffusion3Pipeline`: the shapes autoencoder (32x32 RGB <-> 8x8x4 latents, the
UNet model's weights), an `SD3Transformer2DModel` with `patch_size=1` (64 image tokens;
joint attention in MM-DiT blocks, the last one `context_pre_only` as diffusers builds it),
rectified-flow sampling with `FlowMatchEulerDiscreteScheduler`, and two CLIP-slot encoders
around the frozen MiniLM (dit_text.py). `text_encoder_3` is None, so the pipeline's T5
slot is 256 zero tokens.

Reduced-length training (`reduced_length`, `reduce_text`): in a default call the text
sequence is the CLIP slot (32 tokens) plus 256 T5-slot tokens, and every end, pad and T5
position holds the same zero vector. SD3 adds no position to text tokens, so identical
inputs stay identical in every block (same text stream, same keys and values), and N of
them act in every softmax exactly like one such token whose logit is raised by log(N).
Training keeps the CLIP slot up to the last real token, plus one zero token carrying that
log-count as an additive logit bias (`LogitBiasJointAttnProcessor`): about 74 tokens per
row instead of 352, with the same function as the stock pipeline at full length
(tests/test_shapes_dit.py checks the two agree within 1e-5).
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from .dit_text import SinkClipTextEncoder, create_encoders, load_dit_tokenizer
from .model import LATENT_SIZE, WEIGHTS_DIR, new_vae

T5_LENGTH = 256  # the pipeline's default max_sequence_length: T5-slot tokens in a default call

DIT_CONFIG = dict(
    sample_size=LATENT_SIZE,  # 8x8 latents
    patch_size=1,  # 64 image tokens (Flux's 2x2 packing would leave 16)
    in_channels=4,
    out_channels=4,
    num_layers=6,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=768,  # [text_encoder | text_encoder_2] = [MiniLM | MiniLM]
    caption_projection_dim=64,  # = inner dim (heads x head dim), as SD3 requires
    pooled_projection_dim=768,  # the two (zero) pooled outputs
    pos_embed_max_size=LATENT_SIZE,
)
# rectified flow; shift 1: the 8x8x4 latents need no shift towards noise (SD3 uses 3 at 1024 px)
FLOW_CONFIG = dict(num_train_timesteps=1000, shift=1.0)

FILES = {"transformer": "dit_transformer.safetensors", "text": "dit_text.safetensors", "meta": "dit_model.json"}


def new_transformer(config: dict[str, Any] | None = None, zero_init: bool = False) -> SD3Transformer2DModel:
    """The transformer; zero_init zeroes the adaptive-norm modulations and the output layer
    (DiT's adaLN-Zero start: every block starts as the identity), for training."""
    model = SD3Transformer2DModel(**(config or DIT_CONFIG))
    if zero_init:
        with torch.no_grad():
            for block in model.transformer_blocks:
                for norm in (block.norm1, block.norm1_context):
                    norm.linear.weight.zero_()
                    norm.linear.bias.zero_()
            model.norm_out.linear.weight.zero_()
            model.norm_out.linear.bias.zero_()
            model.proj_out.weight.zero_()
            model.proj_out.bias.zero_()
    return model


def flow_scheduler(config: dict[str, Any] | None = None) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**(config or FLOW_CONFIG))


def parameter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Learned tensors only: the transformer's sin-cos position table is rebuilt, not stored."""
    names = {n for n, _ in model.named_parameters()}
    return {k: v for k, v in model.state_dict().items() if k in names}


def assemble_dit_pipeline(
    vae: AutoencoderKL,
    transformer: SD3Transformer2DModel,
    text_encoder: SinkClipTextEncoder,
    text_encoder_2: SinkClipTextEncoder,
    tokenizer: PreTrainedTokenizerBase,
    scheduler_config: dict[str, Any] | None = None,
) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=flow_scheduler(scheduler_config),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_vae(weights_dir: pathlib.Path, scaling_factor: float) -> AutoencoderKL:
    vae = new_vae()
    vae.load_state_dict({k: v.float() for k, v in load_file(weights_dir / "vae.safetensors").items()})
    # SD3's pipeline decodes latents / scaling_factor + shift_factor
    vae.register_to_config(scaling_factor=scaling_factor, shift_factor=0.0)
    return vae.eval()


def load_dit_pipeline(
    device: str | torch.device = "cpu", weights_dir: str | pathlib.Path | None = None,
    vae_dir: str | pathlib.Path | None = None,
) -> StableDiffusion3Pipeline:
    """The trained transformer shapes pipeline in float32 on `device`, from the packaged
    weights; the autoencoder comes from `vae_dir` (default: the weights folder itself)."""
    wdir = pathlib.Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    meta = json.loads((wdir / FILES["meta"]).read_text())
    vae = load_vae(pathlib.Path(vae_dir) if vae_dir is not None else wdir, meta["scaling_factor"])
    transformer = new_transformer(meta["transformer"])
    state = {k: v.float() for k, v in load_file(wdir / FILES["transformer"]).items()}
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"pos_embed.pos_embed"}:
        raise ValueError(f"transformer weights do not fit: missing {missing}, unexpected {unexpected}")
    tokenizer = load_dit_tokenizer()
    tokenizer.model_max_length = meta["clip_max_length"]
    enc1, enc2 = create_encoders(tokenizer)
    sinks = load_file(wdir / FILES["text"])
    enc1.sink.data.copy_(sinks["sink_1"].float())
    enc2.sink.data.copy_(sinks["sink_2"].float())
    for encoder in (enc1, enc2):
        encoder.eval()  # type: ignore[no-untyped-call]  # unannotated in transformers
    pipe = assemble_dit_pipeline(vae, transformer.eval(), enc1, enc2, tokenizer, meta["scheduler"])
    return pipe.to(device)


# --- reduced-length training -------------------------------------------------------------


@dataclass
class ReducedText:
    """A text sequence with its trailing identical zero tokens folded into one."""

    states: torch.Tensor  # (B, K + 1, J): the CLIP slot up to its last content position, one zero token
    log_count: float  # log of how many zero tokens the last one stands for
    real: torch.Tensor  # (B, K + 1) bool: real-token positions
    start: torch.Tensor  # (B, K + 1) bool: start (sink) positions


def reduce_text(
    clip_states: torch.Tensor, real: torch.Tensor, start: torch.Tensor, t5_length: int = T5_LENGTH
) -> ReducedText:
    """Fold the zero tokens after the batch's last content position (CLIP-slot end and
    pads, and the `t5_length` zero T5-slot tokens) into one token with log-count bias.

    clip_states (B, T, J): the CLIP slot as encode_prompt builds it (before the T5 slot);
    real/start (B, T) bool: where it holds real tokens and the start (sink) vector."""
    content = (real | start).any(0)
    k = int(content.nonzero().max()) + 1 if content.any() else 1
    tail = clip_states[:, k:]
    if tail.numel() and tail.abs().max() != 0:
        raise ValueError("the CLIP slot holds non-zero states after its last content position")
    count = clip_states.shape[1] - k + t5_length
    if count < 1:
        raise ValueError("nothing to fold: the sequence has no zero tokens after its content")
    b, _, j = clip_states.shape
    zero = clip_states.new_zeros(b, 1, j)
    pad = torch.zeros(b, 1, dtype=torch.bool, device=real.device)
    return ReducedText(
        states=torch.cat([clip_states[:, :k], zero], 1),
        log_count=math.log(count),
        real=torch.cat([real[:, :k], pad], 1),
        start=torch.cat([start[:, :k], pad], 1),
    )


@dataclass
class ReducedContext:
    """Shared by the training processors of one transformer: the key bias of the current
    forward, and (when isolating) the text-isolation measurements of each block."""

    bias: torch.Tensor | None = None  # (1, 1, 1, S) additive logit bias over [image; text] keys
    text: ReducedText | None = None
    leaks: list[torch.Tensor] = field(default_factory=list)


class ExplicitJointAttnProcessor:
    """`JointAttnProcessor2_0`'s computation with an explicit softmax, for processors that
    change the logits (:meth:`adjust`) or read the attention (:meth:`seen`)."""

    def adjust(self, logits: torch.Tensor, n: int) -> torch.Tensor:
        """The logits (B, heads, S, S) over [image (n); text] to softmax."""
        return logits

    def seen(self, attn: Any, probs: torch.Tensor, n: int) -> None:
        """Called with the attention (B, heads, S, S) of every block call."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # diffusers' processor call
        n = hidden_states.shape[1]
        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)
        probs = self.adjust((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), n).softmax(-1)
        self.seen(attn, probs, n)
        return joint_output(attn, probs, v, n)


class LogitBiasJointAttnProcessor(ExplicitJointAttnProcessor):
    """`JointAttnProcessor2_0`'s computation with an additive logit bias on the keys (the
    folded zero token's log-count). With `isolate`, it also records how much attention the
    text stream's no-content queries (the sink and the folded zero token) pay to real
    tokens: the route by which prompt content could spread into the end/pad/T5 tokens."""

    def __init__(self, context: ReducedContext, isolate: bool = False):
        self.context = context
        self.isolate = isolate

    def adjust(self, logits: torch.Tensor, n: int) -> torch.Tensor:
        return logits + self.context.bias if self.context.bias is not None else logits

    def seen(self, attn: Any, probs: torch.Tensor, n: int) -> None:
        if self.isolate and not attn.context_pre_only and self.context.text is not None:
            text = self.context.text
            to_real = (probs[:, :, n:, n:] * text.real[:, None, None, :].to(probs.dtype)).sum(-1)  # (B, H, T)
            rows = text.real.any(1)  # captions with real tokens
            if rows.any():
                # the sink (text position 0) and the folded zero token (last position)
                self.context.leaks.append(0.5 * (to_real[rows, :, 0] + to_real[rows, :, -1]).mean())


def joint_qkv(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`JointAttnProcessor2_0`'s queries, keys and values of one MM-DiT block, (B, heads, N + T, d)
    over [image; text], with the block's q/k norms."""
    b, heads = hidden_states.shape[0], attn.heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

    q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    cq = split(attn.add_q_proj(encoder_hidden_states))
    ck = split(attn.add_k_proj(encoder_hidden_states))
    cv = split(attn.add_v_proj(encoder_hidden_states))
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    return torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)


def joint_output(attn: Any, probs: torch.Tensor, v: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's image and text outputs from its attention ``probs`` (B, heads, S, S) over
    [image (n); text] and values ``v``, through the block's output projections."""
    b, heads, _, d = v.shape
    out = (probs @ v).transpose(1, 2).reshape(b, -1, heads * d).to(v.dtype)
    hidden, context = out[:, :n], out[:, n:]
    if not attn.context_pre_only:
        context = attn.to_add_out(context)
    hidden = attn.to_out[1](attn.to_out[0](hidden))
    return hidden, context


@contextlib.contextmanager
def reduced_length(transformer: SD3Transformer2DModel, isolate: bool = False) -> Iterator[ReducedContext]:
    """Install the log-count-bias processors on every block; restore the previous ones after."""
    context = ReducedContext()
    saved = transformer.attn_processors
    transformer.set_attn_processor(LogitBiasJointAttnProcessor(context, isolate))
    try:
        yield context
    finally:
        transformer.set_attn_processor(saved)


def reduced_forward(
    transformer: SD3Transformer2DModel,
    context: ReducedContext,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    text: ReducedText,
    pooled: torch.Tensor,
) -> torch.Tensor:
    """The transformer's output for `text` as if its folded zero token were all of them
    (call inside `reduced_length`)."""
    n_image = (latents.shape[-2] // transformer.config.patch_size) * (latents.shape[-1] // transformer.config.patch_size)
    bias = latents.new_zeros(1, 1, 1, n_image + text.states.shape[1])
    bias[..., -1] = text.log_count
    context.bias, context.text = bias, text
    context.leaks.clear()
    try:
        output: torch.Tensor = transformer(
            hidden_states=latents, encoder_hidden_states=text.states, pooled_projections=pooled,
            timestep=timestep, return_dict=False,
        )[0]
        return output
    finally:
        context.bias = context.text = None


def clip_slot(
    pipe_or_encoders: StableDiffusion3Pipeline | tuple[SinkClipTextEncoder, SinkClipTextEncoder],
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CLIP slot (B, T, 768) as encode_prompt builds it, with its real and start masks.

    `pipe_or_encoders`: a pipeline or (text_encoder, text_encoder_2); `states` (B, T, 384):
    MiniLM's hidden_states[-2] for the prompts when already computed (training caches them)."""
    if isinstance(pipe_or_encoders, StableDiffusion3Pipeline):
        enc1, enc2 = pipe_or_encoders.text_encoder, pipe_or_encoders.text_encoder_2
    else:
        enc1, enc2 = pipe_or_encoders
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(enc1.sink.device)
    if states is None:
        states = enc1.minilm_states(ids)[-2]
    features = torch.cat([enc1.assemble(ids, states), enc2.assemble(ids, states)], -1)
    real = ~torch.isin(ids, enc1.special_ids)
    start = ids == enc1.config.start_token_id
    return ids, features, real, start


def pooled_zeros(pipe_or_transformer: StableDiffusion3Pipeline | SD3Transformer2DModel, batch: int) -> torch.Tensor:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return torch.zeros(batch, transformer.config.pooled_projection_dim)


__all__ = [
    "DIT_CONFIG",
    "FLOW_CONFIG",
    "ExplicitJointAttnProcessor",
    "LogitBiasJointAttnProcessor",
    "ReducedText",
    "assemble_dit_pipeline",
    "clip_slot",
    "joint_output",
    "joint_qkv",
    "load_dit_pipeline",
    "new_transformer",
    "reduce_text",
    "reduced_forward",
    "reduced_length",
]
