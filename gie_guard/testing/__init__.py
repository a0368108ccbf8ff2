"""Tiny random-weight pipelines for tests: no download, built from configs in seconds.

Every builder has the real topology of its family where gie_guard depends on it (block kinds
and counts, attention processors, text encoders and their sequence lengths, masks), with
random weights: use them to test mechanics (hooks, shapes, restoration, bit-identity,
refusals), not erasure quality.

- :mod:`.unet`: Stable Diffusion 1.x/2.x and SDXL (``tiny_sd_pipeline``, ``tiny_sdxl_pipeline``).
- :mod:`.dit`: transformer backbones: Flux (text2img, img2img, inpaint, Kontext, Fill),
  SD3 and SD3.5, PixArt-Sigma, Sana.
- :mod:`.variants`: ControlNet, T2I-Adapter, PAG, LoRA, IP-Adapter and fused-QKV variants.
- :mod:`.tokenizers`: real CLIP BPE (from open-clip-torch's file), small T5-/Gemma-style
  tokenizers, the MiniLM WordPiece tokenizer.

transformers and diffusers are imported when a builder is called, not on import.
"""

from .dit import (
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
    tiny_sd35_pipeline,
)
from .tokenizers import (
    OPEN_CLIP_INSTALL,
    TOKENIZER_MAX_LENGTH,
    clip_tokenizer,
    gemma_tokenizer,
    minilm_tokenizer,
    t5_tokenizer,
    tiny_clip_tokenizer,
)
from .unet import tiny_sd_pipeline, tiny_sdxl_pipeline
from .variants import (
    PEFT_INSTALL,
    tiny_sd_controlnet_pipeline,
    tiny_sd_pag_pipeline,
    tiny_sd_t2i_adapter_pipeline,
    tiny_sdxl_controlnet_pipeline,
    tiny_sdxl_pag_pipeline,
    with_flux_ip_adapter,
    with_fused_qkv,
    with_ip_adapter,
    with_lora,
)

__all__ = [
    # tokenizers
    "TOKENIZER_MAX_LENGTH", "OPEN_CLIP_INSTALL", "minilm_tokenizer", "tiny_clip_tokenizer", "clip_tokenizer",
    "t5_tokenizer", "gemma_tokenizer",
    # UNet pipelines and their variants
    "tiny_sd_pipeline", "tiny_sdxl_pipeline", "tiny_sd_controlnet_pipeline", "tiny_sdxl_controlnet_pipeline",
    "tiny_sd_t2i_adapter_pipeline", "tiny_sd_pag_pipeline", "tiny_sdxl_pag_pipeline",
    "with_lora", "with_ip_adapter", "with_fused_qkv", "with_flux_ip_adapter", "PEFT_INSTALL",
    # transformer backbones
    "tiny_flux_pipeline", "tiny_sd3_pipeline", "tiny_sd35_pipeline", "tiny_pixart_pipeline", "tiny_sana_pipeline",
]
