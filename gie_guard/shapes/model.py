"""Architecture of the shapes model and `load_pipeline`, which builds it offline.

A real `StableDiffusionPipeline`: 32x32 RGB images, an `AutoencoderKL` to 8x8x4 latents,
a UNet with Stable Diffusion 1.x's block layout (16 cross-attention layers, so GIE sees
the same number of layers and adapter features as on SD 1.x), DDIM sampling, and the
frozen-MiniLM sink encoder (text_encoder.py) on 77-token prompts.
`load_pipeline(backbone="dit")` builds the transformer (SD3-family) model instead (dit_model.py).
`load_pipeline(variant="sink-pads")` builds the sink-pads variant: the same architecture and
shared autoencoder, with its own UNet and sink (weights/sink-pads/) trained with end and pad
positions holding copies of the sink, so concept tokens' attention maps are local
(docs/shapes.md, "The sink-pads variant").
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from ..logs import quiet_loading
from .text_encoder import SinkTextEncoder, load_tokenizer

WEIGHTS_DIR = pathlib.Path(__file__).parent / "weights"
# variant name -> folder of its UNet, sink and model.json; the autoencoder is always WEIGHTS_DIR's
VARIANTS = {"default": WEIGHTS_DIR, "sink-pads": WEIGHTS_DIR / "sink-pads"}
# world name -> folder of its UNet, sink and model.json: "one" (32x32, one thing) or "two"
# (32x64 canvas of two cells, world_two.py); the autoencoder is always WEIGHTS_DIR's
WORLDS = {"one": WEIGHTS_DIR, "two": WEIGHTS_DIR / "two"}
LATENT_SIZE = 8  # 32 px / 4 (three encoder blocks)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=32,
)

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=4,  # diffusers reads this as the number of heads
    norm_num_groups=16,
    cross_attention_dim=384,  # MiniLM's hidden size
)

# cosine noise schedule: better than SD's scaled-linear for tiny latents
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE, clip_sample=False)


def sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def new_vae() -> AutoencoderKL:
    return AutoencoderKL(**VAE_CONFIG)


def new_unet(sample_size: int | tuple[int, int] = LATENT_SIZE) -> UNet2DConditionModel:
    """The shapes UNet; ``sample_size`` (latent height, width) only sets the pipeline's
    default image size: (8, 16) for the two-cell world's 32x64 canvas."""
    config = dict(UNET_CONFIG, sample_size=sample_size if isinstance(sample_size, int) else list(sample_size))
    return UNet2DConditionModel(**config)


def assemble_pipeline(
    vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: SinkTextEncoder, tokenizer: PreTrainedTokenizerBase
) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def variant_dir(variant: str | None) -> pathlib.Path:
    """The packaged folder of a UNet variant's weights; ValueError for an unknown name."""
    name = "default" if variant is None else variant
    if name not in VARIANTS:
        raise ValueError(f"unknown shapes variant {variant!r}: expected one of {sorted(VARIANTS)} (or None)")
    return VARIANTS[name]


def load_vae(weights_dir: str | pathlib.Path | None = None) -> AutoencoderKL:
    """The autoencoder in float32 with its latent scaling factor (from ``model.json``)."""
    wdir = pathlib.Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    meta = json.loads((wdir / "model.json").read_text())
    vae = new_vae()
    vae.load_state_dict({k: v.float() for k, v in load_file(wdir / "vae.safetensors").items()})
    vae.register_to_config(scaling_factor=meta["scaling_factor"])
    return vae


@quiet_loading()
def load_pipeline(
    device: str | torch.device = "cpu",
    weights_dir: str | pathlib.Path | None = None,
    backbone: str = "unet",
    variant: str | None = None,
    world: str = "one",
) -> Any:
    """The trained shapes pipeline in float32 on `device`, built from the packaged weights.

    backbone "unet" (default): the `StableDiffusionPipeline`; "dit": the transformer model,
    a `StableDiffusion3Pipeline` (dit_model.py).

    variant (unet only) None or "default": the shipped model (weights/); "sink-pads": the
    sink-pads variant, whose UNet, sink and model.json are in weights/sink-pads/ (or in
    `weights_dir`, e.g. a training run's output folder) and whose autoencoder is the
    shared one in weights/. Its text encoder's end and pad positions hold copies of the
    sink (``pad_mode`` "sink", recorded in its model.json).

    world "one" (default): the models above, one thing on a 32x32 image; "two": the two-cell
    world (world_two.py), 32 rows x 64 columns by default, whose UNet, sink and model.json
    are in weights/two/ (or `weights_dir`); default variant only. With backbone "dit" the
    two-cell transformer (dit_train_two.py; its files dit_* in the same folder), which
    needs ``height=32, width=64`` in calls."""
    if world not in WORLDS:
        raise ValueError(f"unknown shapes world {world!r}: expected one of {sorted(WORLDS)}")
    name = "default" if variant is None else variant
    vdir = variant_dir(variant)  # ValueError for an unknown variant
    if world == "two":
        if name != "default":
            raise ValueError("the two-cell world exists with the default variant only")
        vdir = WORLDS["two"]
        if backbone == "dit":
            from .dit_model import FILES, load_dit_pipeline

            wdir = pathlib.Path(weights_dir) if weights_dir is not None else vdir
            if not (wdir / FILES["meta"]).exists():
                raise ValueError(f"no two-cell transformer weights in {wdir} (train with dit_train_two.py)")
            # SD3's pipeline has one sample_size: generate with height=32, width=64
            from .dit_train_two import set_two_cell_positions

            pipe = load_dit_pipeline(device, wdir, vae_dir=WEIGHTS_DIR)
            set_two_cell_positions(pipe.transformer)  # the table is rebuilt, not stored
            return pipe
    if backbone == "dit":
        if name != "default":
            raise ValueError(f"the shapes variant {variant!r} exists for backbone 'unet' only")
        from .dit_model import load_dit_pipeline

        return load_dit_pipeline(device, weights_dir)
    if backbone != "unet":
        raise ValueError(f"unknown shapes backbone {backbone!r}: expected 'unet' or 'dit'")
    wdir = pathlib.Path(weights_dir) if weights_dir is not None else vdir
    meta = json.loads((wdir / "model.json").read_text())
    # a variant trains only the UNet and sink, on the shared autoencoder
    vae = load_vae(wdir if name == "default" and world == "one" else WEIGHTS_DIR)
    # the two-cell world's model.json records its latent (height, width): (8, 16)
    unet = new_unet(tuple(meta["sample_size"]) if "sample_size" in meta else LATENT_SIZE)
    unet.load_state_dict({k: v.float() for k, v in load_file(wdir / "unet.safetensors").items()})
    tokenizer = load_tokenizer()
    # a run trained with train_two.py --mix-layers N records N; its mixer is in sink.safetensors
    text_encoder = SinkTextEncoder.create(tokenizer, pad_mode=meta.get("pad_mode", "zero"),
                                          mix_layers=int(meta.get("mix_layers", 0)))
    sink_file = load_file(wdir / "sink.safetensors")
    text_encoder.sink.data.copy_(sink_file["sink"].float())
    text_encoder.load_mixer_state(sink_file)
    text_encoder.eval()  # type: ignore[no-untyped-call]  # unannotated in transformers
    pipe = assemble_pipeline(vae.eval(), unet.eval(), text_encoder, tokenizer)
    return pipe.to(device)
