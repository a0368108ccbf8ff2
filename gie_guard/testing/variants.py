"""Variants of the tiny pipelines that change what runs in (or beside) attention:
ControlNet, T2I-Adapter, PAG, LoRA, IP-Adapter, fused QKV projections.

The pipeline builders reuse the components of :func:`~gie_guard.testing.tiny_sd_pipeline` /
:func:`~gie_guard.testing.tiny_sdxl_pipeline` (same seed: same UNet, VAE and text encoders)
and add the extra model, sized so its features line up with the tiny UNet (the tiny VAE
does not downsample, so control images are at latent resolution). The ``with_*`` functions
change a pipeline in place and return it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..engine import family_for
from ..logs import quiet_loading
from .unet import tiny_sd_pipeline, tiny_sdxl_pipeline

__all__ = [
    "tiny_sd_controlnet_pipeline",
    "tiny_sdxl_controlnet_pipeline",
    "tiny_sd_t2i_adapter_pipeline",
    "tiny_sd_pag_pipeline",
    "tiny_sdxl_pag_pipeline",
    "with_lora",
    "with_ip_adapter",
    "with_flux_ip_adapter",
    "with_fused_qkv",
    "PEFT_INSTALL",
]

#: peft is needed by :func:`with_lora` only; the pin keeps pip from replacing torch
PEFT_INSTALL = 'pip install peft "torch==2.13.0"'


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _sd_components(pipe: Any) -> dict[str, Any]:
    keep = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor")
    return {name: pipe.components[name] for name in keep}


def _controlnet_like(unet: Any, *, seed: int) -> Any:
    """A ControlNetModel with the down and mid blocks of ``unet`` (its config), conditioning
    embedding without downsampling (the tiny VAE keeps the resolution)."""
    from diffusers import ControlNetModel

    config = unet.config
    kwargs = dict(
        in_channels=config.in_channels,
        conditioning_channels=3,
        down_block_types=tuple(config.down_block_types),
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        use_linear_projection=config.use_linear_projection,
        transformer_layers_per_block=config.transformer_layers_per_block,
        addition_embed_type=config.addition_embed_type,
        addition_time_embed_dim=config.addition_time_embed_dim,
        projection_class_embeddings_input_dim=config.projection_class_embeddings_input_dim,
        conditioning_embedding_out_channels=(16,),
    )
    with _seeded(seed):
        return ControlNetModel(**kwargs).eval()


@quiet_loading()
def tiny_sd_controlnet_pipeline(multi: bool = False, *, seed: int = 0, sample_size: int = 8) -> Any:
    """``StableDiffusionControlNetPipeline`` on the tiny SD 1.x pipeline, with one ControlNet
    (or two, as ``MultiControlNetModel``, when ``multi``) mirroring the UNet's down and mid
    blocks (14 attention layers each, 7 of them cross-attention over the same text). Call with
    ``image=`` a ``sample_size``-pixel control image (a list of two when ``multi``)."""
    from diffusers import StableDiffusionControlNetPipeline

    base = tiny_sd_pipeline(seed=seed, sample_size=sample_size)
    nets = [_controlnet_like(base.unet, seed=seed + 10 + i) for i in range(2 if multi else 1)]
    pipe = StableDiffusionControlNetPipeline(
        **_sd_components(base), controlnet=nets if multi else nets[0], requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@quiet_loading()
def tiny_sdxl_controlnet_pipeline(multi: bool = False, *, seed: int = 0, sample_size: int = 8) -> Any:
    """``StableDiffusionXLControlNetPipeline`` on the tiny SDXL pipeline, with one ControlNet
    (two when ``multi``) mirroring the UNet's down and mid blocks, text_time conditioning."""
    from diffusers import StableDiffusionXLControlNetPipeline

    base = tiny_sdxl_pipeline(seed=seed, sample_size=sample_size)
    nets = [_controlnet_like(base.unet, seed=seed + 10 + i) for i in range(2 if multi else 1)]
    components = {
        name: base.components[name]
        for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    }
    pipe = StableDiffusionXLControlNetPipeline(**components, controlnet=nets if multi else nets[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@quiet_loading()
def tiny_sd_t2i_adapter_pipeline(*, seed: int = 0, sample_size: int = 8) -> Any:
    """``StableDiffusionAdapterPipeline`` on the tiny SD 1.x pipeline with a full T2I-Adapter
    whose four feature maps match the UNet's four down blocks (channels 32, 32, 64, 64; no
    pixel-unshuffle, since the tiny VAE does not downsample). Call with ``image=``."""
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    base = tiny_sd_pipeline(seed=seed, sample_size=sample_size)
    with _seeded(seed + 10):
        adapter = T2IAdapter(
            in_channels=3,
            channels=list(base.unet.config.block_out_channels),
            num_res_blocks=2,
            downscale_factor=1,
            adapter_type="full_adapter",
        ).eval()
    pipe = StableDiffusionAdapterPipeline(**_sd_components(base), adapter=adapter, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@quiet_loading()
def tiny_sd_pag_pipeline(
    *, seed: int = 0, sample_size: int = 8, pag_applied_layers: str | list[str] = "mid"
) -> Any:
    """``StableDiffusionPAGPipeline`` (perturbed-attention guidance) on the tiny SD 1.x pipeline.
    With ``pag_scale > 0`` (default 3.0) the batch is ``[uncond; cond; cond-perturbed]`` and
    the self-attention of ``pag_applied_layers`` gets PAG processors during the call."""
    from diffusers import StableDiffusionPAGPipeline

    base = tiny_sd_pipeline(seed=seed, sample_size=sample_size)
    pipe = StableDiffusionPAGPipeline(
        **_sd_components(base), requires_safety_checker=False, pag_applied_layers=pag_applied_layers
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@quiet_loading()
def tiny_sdxl_pag_pipeline(
    *, seed: int = 0, sample_size: int = 8, pag_applied_layers: str | list[str] = "mid"
) -> Any:
    """``StableDiffusionXLPAGPipeline`` on the tiny SDXL pipeline (see :func:`tiny_sd_pag_pipeline`)."""
    from diffusers import StableDiffusionXLPAGPipeline

    base = tiny_sdxl_pipeline(seed=seed, sample_size=sample_size)
    components = {
        name: base.components[name]
        for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    }
    pipe = StableDiffusionXLPAGPipeline(**components, pag_applied_layers=pag_applied_layers)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# LoRA


def _denoiser(pipe: Any) -> Any:
    return family_for(pipe).denoiser(pipe)


def with_lora(
    pipe: Any, rank: int = 4, *, seed: int = 0, text_encoders: bool = True, adapter_name: str = "default"
) -> Any:
    """Add a real PEFT LoRA (random, non-zero up and down weights, so it changes the output)
    through diffusers' PEFT integration, ``add_adapter(LoraConfig(...))``, on the UNet (or
    transformer) at ``to_q``/``to_k``/``to_v``/``to_out.0``, and, when ``text_encoders``, with
    ``peft.inject_adapter_in_model`` on every CLIP text encoder at ``q_proj``/``k_proj``/
    ``v_proj``/``out_proj`` (transformers 5's own ``add_adapter`` wants peft >= 0.22, which
    PyPI does not have; diffusers' prompt encoding scales these layers all the same).

    Afterwards ``attn.to_k`` etc. are ``peft.tuners.lora.Linear`` modules wrapping the original
    linear layers; the attention processors are unchanged. Scale it per call with
    ``cross_attention_kwargs={"scale": s}`` (UNet pipelines) or ``pipe.set_adapters``.
    Needs ``peft`` (``pip install peft "torch==2.13.0"``).
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"with_lora needs peft: {PEFT_INSTALL}") from exc

    def config(targets: Sequence[str]) -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(targets))

    with _seeded(seed):
        _denoiser(pipe).add_adapter(config(["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=adapter_name)
        if text_encoders:
            for name in family_for(pipe).text_encoder_attrs:
                encoder = getattr(pipe, name, None)
                if encoder is not None and type(encoder).__name__.startswith("CLIPTextModel"):
                    # peft directly: transformers 5's ``add_adapter`` asks for peft >= 0.22, not on PyPI yet
                    inject_adapter_in_model(config(["q_proj", "k_proj", "v_proj", "out_proj"]), encoder, adapter_name)
    return pipe


# ---------------------------------------------------------------------------------------------
# IP-Adapter


def _image_encoder_and_processor(*, projection_dim: int, image_size: int = 32, seed: int) -> tuple[Any, Any]:
    """A tiny ``CLIPVisionModelWithProjection`` (image 32 px, patch 8) and its image processor."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    processor_cls: type[Any]
    try:  # transformers >= 5 without torchvision: the PIL backend, imported directly to stay quiet
        from transformers import CLIPImageProcessorPil

        processor_cls = CLIPImageProcessorPil
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor

        processor_cls = CLIPImageProcessor

    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=image_size, patch_size=8, projection_dim=projection_dim, hidden_act="quick_gelu",
    )
    with _seeded(seed):
        # transformers' PreTrainedModel.eval() has no annotations
        encoder = CLIPVisionModelWithProjection(config).eval()  # type: ignore[no-untyped-call]
    processor = processor_cls(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return encoder, processor


def _random_like(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * 0.05


def _image_projection(
    tokens: int, dim: int, image_embed_dim: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``ImageProjection`` weights: an image embedding to ``tokens`` tokens of width ``dim``."""
    return {
        "proj.weight": _random_like((tokens * dim, image_embed_dim), generator),
        "proj.bias": torch.zeros(tokens * dim),
        "norm.weight": torch.ones(dim),
        "norm.bias": torch.zeros(dim),
    }


def _add_image_encoder(pipe: Any, image_embed_dim: int, seed: int) -> None:
    encoder, processor = _image_encoder_and_processor(projection_dim=image_embed_dim, seed=seed)
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)


def with_ip_adapter(pipe: Any, *, seed: int = 0, image_embed_dim: int = 16, num_tokens: int = 4) -> Any:
    """Load a real IP-Adapter (the plain one: 4 image tokens through ``ImageProjection``) with
    random weights into a tiny SD 1.x/2.x or SDXL UNet through the public loader
    (``pipe.load_ip_adapter(state_dict, ...)``), and register a tiny
    ``CLIPVisionModelWithProjection`` image encoder and its image processor, so that
    ``pipe(prompt, ip_adapter_image=image)`` runs. Every cross-attention layer then runs
    ``IPAdapterAttnProcessor2_0`` (its extra ``to_k_ip``/``to_v_ip`` over the image tokens)."""
    if num_tokens != 4:
        raise ValueError("the plain IP-Adapter layout has 4 image tokens")
    unet = pipe.unet
    cross_dim = unet.config.cross_attention_dim
    channels = list(unet.config.block_out_channels)
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, torch.Tensor] = {}
    key_id = 1  # diffusers numbers self-attention layers 0, 2, ... and cross-attention layers 1, 3, ...
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        layers[f"{key_id}.to_k_ip.weight"] = _random_like((hidden, cross_dim), generator)
        layers[f"{key_id}.to_v_ip.weight"] = _random_like((hidden, cross_dim), generator)
        key_id += 2
    image_proj = _image_projection(num_tokens, cross_dim, image_embed_dim, generator)
    _add_image_encoder(pipe, image_embed_dim, seed + 20)
    pipe.load_ip_adapter(
        {"image_proj": image_proj, "ip_adapter": layers}, subfolder="", weight_name="", low_cpu_mem_usage=False
    )
    return pipe


def with_flux_ip_adapter(pipe: Any, *, seed: int = 0, image_embed_dim: int = 16) -> Any:
    """Load a Flux IP-Adapter (XLabs layout: ``to_k_ip``/``to_v_ip`` with bias in every
    double-stream block, 4 image tokens) with random weights through
    ``FluxPipeline.load_ip_adapter``, and register a tiny CLIP image encoder and processor, so
    ``pipe(prompt, ip_adapter_image=image, ...)`` runs. The double-stream blocks then run
    ``FluxIPAdapterAttnProcessor``; the single-stream blocks keep ``FluxAttnProcessor``.
    It exists so that the engine can be tested to refuse it."""
    transformer = pipe.transformer
    joint_dim = transformer.config.joint_attention_dim
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, torch.Tensor] = {}
    key_id = 0  # numbered over the double-stream blocks only
    for name in transformer.attn_processors:
        if name.startswith("single_transformer_blocks"):
            continue
        for proj in ("to_k_ip", "to_v_ip"):
            layers[f"{key_id}.{proj}.weight"] = _random_like((hidden, joint_dim), generator)
            layers[f"{key_id}.{proj}.bias"] = torch.zeros(hidden)
        key_id += 1
    image_proj = _image_projection(4, joint_dim, image_embed_dim, generator)
    _add_image_encoder(pipe, image_embed_dim, seed + 20)
    pipe.load_ip_adapter(
        {"image_proj": image_proj, "ip_adapter": layers},
        weight_name="",
        image_encoder_pretrained_model_name_or_path=None,
        image_encoder_dtype=torch.float32,
        low_cpu_mem_usage=False,
    )
    return pipe


# ---------------------------------------------------------------------------------------------
# fused projections


def with_fused_qkv(pipe: Any) -> Any:
    """Fuse the attention projections in place (``pipe.fuse_qkv_projections()``, or the
    transformer's where the pipeline has none): self-attention ``to_q``/``to_k``/``to_v`` become
    one ``to_qkv``, cross-attention ``to_k``/``to_v`` one ``to_kv``, and the processors become
    their fused variants (e.g. ``FusedAttnProcessor2_0`` in UNets). The VAE is left alone.
    ``pipe.unfuse_qkv_projections()`` undoes it."""
    if hasattr(pipe, "fuse_qkv_projections"):
        try:
            pipe.fuse_qkv_projections(vae=False)
        except TypeError:  # a pipeline whose fuse method has no ``vae`` switch
            pipe.fuse_qkv_projections()
    else:
        _denoiser(pipe).fuse_qkv_projections()
    return pipe

