"""Tiny random-weight transformer-backbone (DiT) pipelines: Flux, Chroma, SD3/SD3.5, PixArt-Sigma, Sana.

Each builder makes the family's real diffusers pipeline class from small configs with the
real topology where a guard depends on it (block kinds and counts, joint vs cross attention,
the attention processors diffusers installs, the text encoders, tokenizers and sequence
lengths each pipeline passes by default, text attention masks), in about a second, with no
download. Weights are random: test mechanics, not image quality.

The VAEs do not downsample (``vae_scale_factor == 1``, real ones: 8, Sana's 32), so a 32 px
image has 32x32 latents: Flux packs them into 16x16 = 256 image tokens, SD3 and PixArt
patchify them (patch 2) into 256 tokens as well, Sana (patch 1, a DC-AE that halves) 256.

Call-time notes (see each builder's docstring):

- Flux's default ``max_sequence_length`` (512 T5 tokens) works and is cheap. Kontext needs
  ``_auto_resize=False`` and ``max_area=height * width`` (its defaults resize the input image
  and the output to about 1 MP: a million image tokens here).
- PixArt-Sigma and Sana need ``use_resolution_binning=False`` (their bins start at 256/512 px,
  which with these VAEs means 16k-65k image tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..logs import quiet_loading
from .tokenizers import clip_tokenizer, gemma_tokenizer, t5_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "tiny_flux_pipeline",
    "tiny_chroma_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd35_pipeline",
    "tiny_pixart_pipeline",
    "tiny_sana_pipeline",
]

# text widths, chosen all different so that a mix-up of encoders shows as a shape error
_FLUX_CLIP_HIDDEN = 32  # pooled CLIP -> pooled_projection_dim
_FLUX_T5_HIDDEN = 48  # T5 -> joint_attention_dim
_CHROMA_T5_HIDDEN = 56
_SD3_CLIP_L_HIDDEN = 32
_SD3_CLIP_G_HIDDEN = 48  # CLIP-L + CLIP-G = 80 (pooled and per token), zero-padded to T5's width
_SD3_T5_HIDDEN = 96
_PIXART_T5_HIDDEN = 40
_SANA_GEMMA_HIDDEN = 32


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator for one component, and restore the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _clip_text_encoder(
    tokenizer: PreTrainedTokenizerBase, hidden: int, *, with_projection: bool, seed: int
) -> PreTrainedModel:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,  # SD3 reads the penultimate layer
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # the pooled output is read at the first end token
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden,
        hidden_act="quick_gelu",
    )
    with _seeded(seed):
        model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        model: PreTrainedModel = model_cls(config).eval()  # type: ignore[no-untyped-call]  # untyped upstream
    return model


def _t5_encoder(tokenizer: PreTrainedTokenizerBase, d_model: int, *, seed: int) -> PreTrainedModel:
    from transformers import T5Config, T5EncoderModel

    # transformers' T5Config declares only T5's own fields; the shared ones reach PreTrainedConfig as kwargs
    config = T5Config(  # type: ignore[call-arg]
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1 / XXL, as in Flux, SD3 and PixArt
        is_encoder_decoder=False,
        use_cache=False,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with _seeded(seed):
        model: PreTrainedModel = T5EncoderModel(config).eval()  # type: ignore[no-untyped-call]  # untyped upstream
    return model


def _kl_vae(
    *, seed: int, latent_channels: int = 4, shift_factor: float | None = None, scaling_factor: float = 0.18215
) -> Any:
    """An AutoencoderKL that does not downsample; ``shift_factor`` and no quant convs as in Flux/SD3."""
    from diffusers import AutoencoderKL

    flow = shift_factor is not None
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            block_out_channels=(32,),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=32,
            sample_size=32,
            shift_factor=shift_factor,
            scaling_factor=scaling_factor,
            use_quant_conv=not flow,
            use_post_quant_conv=not flow,
        ).eval()


def _finish(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# Flux

FluxKind = Literal["text2img", "img2img", "inpaint", "kontext", "fill"]


@quiet_loading()
def tiny_flux_pipeline(kind: FluxKind = "text2img", *, seed: int = 0, guidance_embeds: bool = False) -> Any:
    """A Flux.1 pipeline (``FluxPipeline``, ``FluxImg2ImgPipeline``, ``FluxInpaintPipeline``,
    ``FluxKontextPipeline`` or ``FluxFillPipeline``), random weights.

    ``FluxTransformer2DModel``: 2 double-stream ``transformer_blocks`` (image and text streams,
    one joint softmax over ``[text; image]``) then 2 single-stream ``single_transformer_blocks``
    (one concatenated sequence), 2 heads of 16, RoPE axes (4, 6, 6) summing to the head dim.
    Text: CLIP (pooled output only, 77 tokens, real CLIP BPE) and a T5 encoder (per-token
    states, 512 tokens by default, T5-style tokenizer; ``text_ids`` are zeros). VAE: 4 latent
    channels as Flux's, packed 2x2 into 64 transformer channels (Fill: 64 + 64 masked-image +
    4 mask channels in, 64 out). Scheduler: FlowMatchEulerDiscreteScheduler with Flux's dynamic shift.

    ``guidance_embeds=True`` is FLUX.1-dev's guidance distillation (a guidance embedding, no
    CFG batch); False is schnell's. Height/width must be multiples of 2 (16-64 px are cheap).
    Kontext: pass ``image=``, ``height``, ``width``, ``max_area=height * width`` and
    ``_auto_resize=False`` (and ``prompt=`` by name: Kontext's first parameter is ``image``).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxImg2ImgPipeline,
        FluxInpaintPipeline,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    pipeline_cls = {
        "text2img": FluxPipeline,
        "img2img": FluxImg2ImgPipeline,
        "inpaint": FluxInpaintPipeline,
        "kontext": FluxKontextPipeline,
        "fill": FluxFillPipeline,
    }[kind]
    latent_channels = 16  # as Flux's VAE
    packed = 4 * latent_channels
    # Fill also sees the packed masked-image latents and the mask (vae_scale_factor**2 * 4 channels)
    in_channels = 2 * packed + 4 if kind == "fill" else packed
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=in_channels, out_channels=packed, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6), guidance_embeds=guidance_embeds,
            joint_attention_dim=_FLUX_T5_HIDDEN, pooled_projection_dim=_FLUX_CLIP_HIDDEN,
        ).eval()
    tokenizer = clip_tokenizer()
    tokenizer_2 = t5_tokenizer(max_length=512)
    components = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_kl_vae(seed=seed + 1, latent_channels=latent_channels, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=_clip_text_encoder(tokenizer, _FLUX_CLIP_HIDDEN, with_projection=False, seed=seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2, _FLUX_T5_HIDDEN, seed=seed + 3),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    if kind in ("text2img", "img2img", "inpaint", "kontext"):
        components.update(image_encoder=None, feature_extractor=None)
    return _finish(pipeline_cls(**components))


# ---------------------------------------------------------------------------------------------
# Chroma

ChromaKind = Literal["text2img", "img2img"]


@quiet_loading()
def tiny_chroma_pipeline(kind: ChromaKind = "text2img", *, seed: int = 0) -> Any:
    """A Chroma pipeline (``ChromaPipeline`` or ``ChromaImg2ImgPipeline``), random weights.

    ``ChromaTransformer2DModel``: Flux's layout with its attention (``FluxAttention``,
    ``FluxAttnProcessor``): 2 double-stream ``transformer_blocks`` then 2 single-stream
    ``single_transformer_blocks``, 2 heads of 16, RoPE axes (4, 6, 6); modulation from a small
    approximator (16 channels, width 32, 1 layer) instead of Flux's pooled CLIP vector. Text: a
    T5 encoder only (width 56, T5-style tokenizer, 512 tokens by default; ``text_ids`` are
    zeros), run with the padding mask; the pipeline passes the transformer an attention mask
    over ``[text; image]`` (the prompt's tokens, its end token and one pad, then every image
    token) that every block turns into a ``(B, 1, S, S)`` mask for its attention. Classifier-free
    guidance (``guidance_scale > 1``, the default 5) is a second denoiser call on the negative
    prompt. VAE and packing as :func:`tiny_flux_pipeline`. Height/width: multiples of 2 (pass
    them: the pipeline's default is 128 px here).
    """
    from diffusers import ChromaImg2ImgPipeline, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    pipeline_cls = {"text2img": ChromaPipeline, "img2img": ChromaImg2ImgPipeline}[kind]
    latent_channels = 16
    packed = 4 * latent_channels
    with _seeded(seed):
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=packed, out_channels=packed, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6),
            joint_attention_dim=_CHROMA_T5_HIDDEN, approximator_num_channels=16, approximator_hidden_dim=32,
            approximator_layers=1,
        ).eval()
    tokenizer = t5_tokenizer(max_length=512)
    pipe = pipeline_cls(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_kl_vae(seed=seed + 1, latent_channels=latent_channels, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=_t5_encoder(tokenizer, _CHROMA_T5_HIDDEN, seed=seed + 2),
        tokenizer=tokenizer,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe)


# ---------------------------------------------------------------------------------------------
# Stable Diffusion 3 / 3.5

SD3Kind = Literal["text2img", "img2img", "inpaint"]


def _sd3(
    kind: SD3Kind, *, seed: int, with_t5: bool, dual_attention_layers: tuple[int, ...], qk_norm: str | None
) -> Any:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Img2ImgPipeline,
        StableDiffusion3InpaintPipeline,
        StableDiffusion3Pipeline,
    )

    pipeline_cls = {
        "text2img": StableDiffusion3Pipeline,
        "img2img": StableDiffusion3Img2ImgPipeline,
        "inpaint": StableDiffusion3InpaintPipeline,
    }[kind]
    heads, head_dim = 2, 16
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=32,  # default height/width: 32 px
            patch_size=2,
            in_channels=16,  # SD3's VAE has 16 latent channels (its inpaint pipeline insists)
            out_channels=16,
            num_layers=3,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=_SD3_T5_HIDDEN,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=_SD3_CLIP_L_HIDDEN + _SD3_CLIP_G_HIDDEN,
            pos_embed_max_size=32,  # up to 64 px
            dual_attention_layers=dual_attention_layers,
            qk_norm=qk_norm,
        ).eval()
    tokenizer = clip_tokenizer()  # CLIP-L pads with <|endoftext|>
    tokenizer_2 = clip_tokenizer(pad_token="!")  # OpenCLIP bigG pads with "!" (id 0)
    tokenizer_3 = t5_tokenizer(max_length=512) if with_t5 else None
    components = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_kl_vae(seed=seed + 1, latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=_clip_text_encoder(tokenizer, _SD3_CLIP_L_HIDDEN, with_projection=True, seed=seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=_clip_text_encoder(tokenizer_2, _SD3_CLIP_G_HIDDEN, with_projection=True, seed=seed + 3),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(tokenizer_3, _SD3_T5_HIDDEN, seed=seed + 4) if tokenizer_3 is not None else None,
        tokenizer_3=tokenizer_3,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipeline_cls(**components))


@quiet_loading()
def tiny_sd3_pipeline(kind: SD3Kind = "text2img", *, seed: int = 0, with_t5: bool = True) -> Any:
    """A Stable Diffusion 3 pipeline (MM-DiT), random weights.

    ``SD3Transformer2DModel``: 3 joint blocks (``transformer_blocks``, ``JointAttnProcessor2_0``:
    one softmax over ``[image; text]``), the last with ``context_pre_only=True`` (its text
    stream is not updated), 2 heads of 16, patch 2. Text, as SD3: CLIP-L (width 32, pads with
    ``<|endoftext|>``) and CLIP-G (width 48, pads with ``!``), both with projection, penultimate
    states concatenated (80) and zero-padded to T5's width (96), then T5's 256 tokens appended
    (zeros when ``with_t5=False``): 77 + 256 = 333 text tokens by default. Pooled: 32 + 48.
    Default height/width 32 px.
    """
    return _sd3(kind, seed=seed, with_t5=with_t5, dual_attention_layers=(), qk_norm=None)


@quiet_loading()
def tiny_sd35_pipeline(kind: SD3Kind = "text2img", *, seed: int = 0, with_t5: bool = True) -> Any:
    """An SD3.5-Medium-style pipeline: as :func:`tiny_sd3_pipeline` with RMS q/k norms and
    ``dual_attention_layers=(0, 1)`` (those blocks also run an image-only self-attention
    ``attn2`` beside the joint attention)."""
    return _sd3(kind, seed=seed, with_t5=with_t5, dual_attention_layers=(0, 1), qk_norm="rms_norm")


# ---------------------------------------------------------------------------------------------
# PixArt-Sigma


@quiet_loading()
def tiny_pixart_pipeline(*, seed: int = 0) -> Any:
    """A ``PixArtSigmaPipeline``, random weights.

    ``PixArtTransformer2DModel``: 3 blocks, each image self-attention ``attn1`` then
    cross-attention ``attn2`` over T5 states (projected from 40 to the inner width 24;
    3 heads of 8), adaLN-single, patch 2, learned sigma (8 output channels for 4 latent).
    Text: T5 (T5-style tokenizer), 300 tokens by default, the padding mask passed to the encoder
    and to every ``attn2`` (as a -10000 bias on the pads). Call with
    ``use_resolution_binning=False`` and ``height``/``width`` (default 32 px).
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    heads, head_dim = 3, 8
    with _seeded(seed):
        transformer = PixArtTransformer2DModel(
            sample_size=32, num_layers=3, num_attention_heads=heads, attention_head_dim=head_dim,
            in_channels=4, out_channels=8, patch_size=2,  # learned sigma: 8 output channels for 4 latent
            cross_attention_dim=heads * head_dim, caption_channels=_PIXART_T5_HIDDEN, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, norm_num_groups=1,
            use_additional_conditions=False,  # Sigma
        ).eval()
    tokenizer = t5_tokenizer(max_length=512)
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(tokenizer, _PIXART_T5_HIDDEN, seed=seed + 1),
        vae=_kl_vae(seed=seed + 2),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(
            beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2, prediction_type="epsilon"
        ),
    )
    return _finish(pipe)


# ---------------------------------------------------------------------------------------------
# Sana


@quiet_loading()
def tiny_sana_pipeline(*, seed: int = 0) -> Any:
    """A ``SanaPipeline``, random weights.

    ``SanaTransformer2DModel``: 2 blocks, each a linear self-attention ``attn1``
    (``SanaLinearAttnProcessor2_0``) then cross-attention ``attn2`` over Gemma-2 states
    (``SanaAttnProcessor2_0``, 2 heads of 8, caption 32 -> 16), patch 1. Text: a tiny
    ``Gemma2Model`` with a Gemma-style tokenizer (``<bos>`` first, padded right); by default the
    pipeline prepends its complex-human-instruction and keeps ``<bos>`` plus the last 299 of
    ``len(instruction) + 298`` tokens: 300 per prompt, with the padding mask passed to the
    encoder and every ``attn2``. VAE: a tiny ``AutoencoderDC`` (8 latent channels, halves).
    Scheduler: DPM-Solver++ with flow sigmas as Sana ships. Call with
    ``use_resolution_binning=False`` and ``height``/``width`` (multiples of 2).
    """
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    latent_channels = 8
    with _seeded(seed):
        transformer = SanaTransformer2DModel(
            in_channels=latent_channels, out_channels=latent_channels, num_layers=2, mlp_ratio=2.5,
            num_attention_heads=2, attention_head_dim=8,  # linear self-attention
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
            caption_channels=_SANA_GEMMA_HIDDEN, sample_size=16, patch_size=1,
        ).eval()
    with _seeded(seed + 1):
        vae = AutoencoderDC(
            in_channels=3, latent_channels=latent_channels, attention_head_dim=8, scaling_factor=0.41407,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
            decoder_norm_types="rms_norm", decoder_act_fns="silu",
        ).eval()
    tokenizer = gemma_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=_SANA_GEMMA_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=2048, sliding_window=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with _seeded(seed + 2):
        text_encoder = Gemma2Model(config).eval()  # type: ignore[no-untyped-call]  # unannotated in transformers
    scheduler = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        flow_shift=3.0,
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        final_sigmas_type="zero",
    )
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    return _finish(pipe)
