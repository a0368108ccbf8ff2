"""What the benchmarks share: real-width pipelines with random weights, seeded generation,
peak-memory readings and markdown tables. Nothing here is part of the library."""

from __future__ import annotations

import json
import os
import pathlib
import statistics
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

__all__ = [
    "CONCEPT_WORDS",
    "concept_policy",
    "generate",
    "markdown_table",
    "peak_memory_mib",
    "peak_memory_reset",
    "real_width_pipeline",
    "REAL_WIDTHS",
    "tiny_pipeline",
    "write_results",
]

# eight words every test tokenizer spells (CLIP BPE, the T5-style vocabulary, WordPiece)
CONCEPT_WORDS = ("nude", "car", "cat", "dog", "beach", "painting", "person", "photo")


def concept_policy(count: int, *, scale: float = 3.0, window: tuple[float, float] = (0.0, 1.0), name: str = "bench") -> dict:
    """A policy dict with ``count`` concepts (one word each), no deduplication."""
    concepts = [{"id": f"c{i}", "text": CONCEPT_WORDS[i % len(CONCEPT_WORDS)] + ("" if i < len(CONCEPT_WORDS) else f" {i}"),
                 "scale": scale} for i in range(count)]
    return {"name": name, "inhibit_steps": list(window), "dedup_threshold": 0.0, "concepts": concepts}


def generate(call: Callable[..., Any], prompts: Sequence[str], seeds: Sequence[int], **kwargs: Any) -> Any:
    """One batched call, image ``i`` from generator seed ``seeds[i]``."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return call(prompt=list(prompts), generator=generators, **kwargs)


# -- memory -------------------------------------------------------------------------------------


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_reset(device: torch.device) -> float:
    """Reset the peak counter; returns the memory in use now (MiB): the baseline of what follows."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mib("VmRSS")


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mib("VmHWM")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: pathlib.Path, data: Any, lines: Sequence[str]) -> None:
    """``out``/results.json (``data``) and ``out``/results.md (``lines``), the markdown also printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- real-width pipelines ------------------------------------------------------------------------

# The width of each production model the benchmark copies (depth is reduced to fit 24 GiB
# and the time budget; per-step cost scales with depth for guarded and unguarded alike).
REAL_WIDTHS = {
    "unet": "Stable Diffusion 1.5 UNet (860 M parameters, full depth), CLIP width 768",
    "sd3": "SD3-medium width: 24 heads x 64 (1536), joint dim 4096, 4 of 24 joint blocks",
    "flux": "FLUX.1-dev width: 24 heads x 128 (3072), joint dim 4096, 2 of 19 double + 4 of 38 single blocks",
    "pixart": "PixArt-Sigma width: 16 heads x 72 (1152), T5 dim 4096, 4 of 28 blocks",
}


def _clip(tokenizer: Any, hidden: int, *, projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(tokenizer: Any, d_model: int = 4096) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        use_cache=False, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, *, flow: bool) -> Any:
    """A thin AutoencoderKL with the real factor 8 (four blocks), so latents have real sizes."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=32, shift_factor=0.0 if flow else None,
        use_quant_conv=not flow, use_post_quant_conv=not flow,
    ).eval()


def real_width_pipeline(family: str, size: int, *, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A diffusers pipeline of ``family`` whose denoiser has the production model's width
    (REAL_WIDTHS), with random weights and text encoders as thin as their output widths allow."""
    import diffusers

    from gie_guard.testing import clip_tokenizer, t5_tokenizer

    torch.manual_seed(seed)
    sample = size // 8
    if family == "unet":
        tok = clip_tokenizer()
        pipe = diffusers.StableDiffusionPipeline(
            unet=diffusers.UNet2DConditionModel(sample_size=sample, cross_attention_dim=768),
            vae=_vae(4, flow=False), text_encoder=_clip(tok, 768), tokenizer=tok,
            scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    elif family == "sd3":
        tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer(max_length=256)
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=diffusers.SD3Transformer2DModel(
                sample_size=sample, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=max(96, sample // 2)),
            vae=_vae(16, flow=True), text_encoder=_clip(tok, 768, projection=True), tokenizer=tok,
            text_encoder_2=_clip(tok2, 1280, projection=True), tokenizer_2=tok2, text_encoder_3=_t5(tok3),
            tokenizer_3=tok3, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    elif family == "flux":
        tok, tok2 = clip_tokenizer(), t5_tokenizer(max_length=512)
        pipe = diffusers.FluxPipeline(
            transformer=diffusers.FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56)),
            vae=_vae(16, flow=True), text_encoder=_clip(tok, 768), tokenizer=tok, text_encoder_2=_t5(tok2),
            tokenizer_2=tok2, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    elif family == "pixart":
        tok = t5_tokenizer(max_length=512)
        pipe = diffusers.PixArtSigmaPipeline(
            transformer=diffusers.PixArtTransformer2DModel(
                sample_size=sample, num_layers=4, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                out_channels=8, patch_size=2, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False),
            vae=_vae(4, flow=False), text_encoder=_t5(tok), tokenizer=tok,
            scheduler=diffusers.DPMSolverMultistepScheduler(),
        )
    else:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(REAL_WIDTHS)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def tiny_pipeline(family: str) -> tuple[Any, dict[str, Any]]:
    """The family's tiny random pipeline from gie_guard.testing and settings for a cheap call
    (the benchmarks' --smoke mode: checks that a benchmark runs, measures nothing)."""
    from gie_guard.testing import dit, tiny_sd_pipeline

    if family == "unet":
        return tiny_sd_pipeline(), {"output_type": "latent"}
    builders = {"sd3": dit.tiny_sd3_pipeline, "flux": dit.tiny_flux_pipeline, "pixart": dit.tiny_pixart_pipeline}
    settings: dict[str, Any] = {"height": 16, "width": 16, "output_type": "latent"}
    if family == "pixart":
        settings.update(use_resolution_binning=False, max_sequence_length=48)
    if family == "flux":
        settings["max_sequence_length"] = 48
    return builders[family](), settings


def call_settings(family: str, size: int) -> dict[str, Any]:
    """Keyword arguments that make a call of ``real_width_pipeline(family, size)`` cheap and valid."""
    settings: dict[str, Any] = {"height": size, "width": size, "output_type": "latent"}
    if family == "flux":
        settings["max_sequence_length"] = 256
    if family == "pixart":
        settings.update(use_resolution_binning=False, max_sequence_length=120)
    return settings
