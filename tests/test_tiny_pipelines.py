"""The tiny random-weight pipelines of gie_guard.testing: they build offline, generate, are
deterministic, and have the topology facts the engine relies on."""

from __future__ import annotations

import collections

import numpy as np
import PIL.Image
import pytest
import torch

from gie_guard import testing as T

PROMPT = "a photo of Vincent van Gogh, nude"


def _image(size: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def _mask(size: int) -> PIL.Image.Image:
    mask = np.zeros((size, size), dtype="uint8")
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return PIL.Image.fromarray(mask)


def _generate(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs.setdefault("prompt", PROMPT)
    return pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def _processors(model) -> dict[str, int]:
    return dict(collections.Counter(type(p).__name__ for p in model.attn_processors.values()))


def _denoiser_inputs(pipe, **call) -> dict:
    """The keyword arguments of the denoiser's first forward in a 2-step call."""
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    seen: list[dict] = []
    handle = denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(dict(kwargs, _args=args)), with_kwargs=True
    )
    try:
        _generate(pipe, **call)
    finally:
        handle.remove()
    return seen[0]


# ---------------------------------------------------------------------------------------------
# the package keeps today's API


def test_existing_imports_still_work():
    from gie_guard.testing import (  # noqa: F401
        TOKENIZER_MAX_LENGTH,
        minilm_tokenizer,
        tiny_clip_tokenizer,
        tiny_sd_pipeline,
        tiny_sdxl_pipeline,
    )
    from gie_guard.testing.unet import tiny_sd_pipeline as same

    assert TOKENIZER_MAX_LENGTH == 77 and same is tiny_sd_pipeline
    for name in T.__all__:
        assert hasattr(T, name), name


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_clip_tokenizer_is_sd1_tokenizer():
    tokenizer = T.clip_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer(PROMPT).input_ids == [49406, 320, 1125, 539, 10357, 2451, 19697, 267, 16630, 49407]
    padded = tokenizer("a cat", padding="max_length", max_length=8).input_ids
    assert padded == [49406, 320, 2368, 49407, 49407, 49407, 49407, 49407]
    sd2 = T.clip_tokenizer(pad_token="!")  # SD 2.x, SDXL's and SD3's second tokenizer: pads with id 0
    assert sd2("a cat", padding="max_length", max_length=8).input_ids == [49406, 320, 2368, 49407, 0, 0, 0, 0]
    assert T.tokenizers._clip_files()[0].is_file()  # cached on disk for the next build


def test_t5_tokenizer_has_no_start_token_and_appends_eos():
    tokenizer = T.t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token_id is None and tokenizer.model_max_length == 512
    ids = tokenizer(PROMPT).input_ids
    assert ids[-1] == 1 and 1 not in ids[:-1] and 0 not in ids and 2 not in ids
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["▁a", "▁photo", "▁of"]
    batch = tokenizer(["a cat", "a"], padding="max_length", max_length=6, return_tensors="pt")
    assert batch.input_ids[:, -1].tolist() == [0, 0] and batch.attention_mask.sum(-1).tolist() == [3, 2]
    sentinels = tokenizer.convert_tokens_to_ids(["<extra_id_99>", "<extra_id_0>"])  # as T5: <extra_id_0> last
    assert sentinels == [len(tokenizer) - 100, len(tokenizer) - 1]


def test_gemma_tokenizer_prepends_bos_only():
    tokenizer = T.gemma_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    ids = tokenizer("line one\nline two: ünïcode").input_ids
    assert ids[0] == 2 and 2 not in ids[1:] and 1 not in ids and 3 not in ids  # bytes, never <unk>
    assert tokenizer.decode(ids, skip_special_tokens=True) == "line one\nline two: ünïcode"


# ---------------------------------------------------------------------------------------------
# Flux


@pytest.fixture(scope="module")
def flux():
    return T.tiny_flux_pipeline()


def test_flux_topology(flux):
    transformer = flux.transformer
    config = transformer.config
    assert len(transformer.transformer_blocks) >= 2 and len(transformer.single_transformer_blocks) >= 2
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert config.in_channels == 4 * flux.vae.config.latent_channels
    names = list(transformer.attn_processors)
    assert sum(n.startswith("transformer_blocks.") for n in names) == len(transformer.transformer_blocks)
    assert sum(n.startswith("single_transformer_blocks.") for n in names) == len(transformer.single_transformer_blocks)
    assert _processors(transformer) == {"FluxAttnProcessor": len(names)}
    assert transformer.transformer_blocks[0].attn.added_kv_proj_dim is not None  # the text stream's own projections
    assert not hasattr(transformer.single_transformer_blocks[0].attn, "add_k_proj")


def test_flux_default_sequence_lengths(flux):
    seen = _denoiser_inputs(flux, height=32, width=32)  # default max_sequence_length: 512
    assert tuple(seen["encoder_hidden_states"].shape) == (1, 512, flux.transformer.config.joint_attention_dim)
    assert tuple(seen["pooled_projections"].shape) == (1, flux.transformer.config.pooled_projection_dim)
    assert tuple(seen["hidden_states"].shape) == (1, 16 * 16, flux.transformer.config.in_channels)
    assert torch.all(seen["txt_ids"] == 0)


def test_flux_generates_deterministically(flux):
    first = _generate(flux, height=32, width=32)
    assert first.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(first, _generate(flux, height=32, width=32))
    rebuilt = T.tiny_flux_pipeline()
    np.testing.assert_array_equal(first, _generate(rebuilt, height=32, width=32))


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "kontext", "fill"])
def test_flux_kinds_generate(kind):
    pipe = T.tiny_flux_pipeline(kind, guidance_embeds=kind in ("kontext", "fill"))  # dev-based models
    call = dict(height=32, width=32)
    if kind == "img2img":
        call.update(image=_image(32), strength=1.0)
    elif kind in ("inpaint", "fill"):
        call.update(image=_image(32), mask_image=_mask(32))
        if kind == "inpaint":
            call.update(strength=1.0)
    else:
        call.update(image=_image(32), _auto_resize=False, max_area=32 * 32)
    assert _generate(pipe, **call).shape == (1, 32, 32, 3)
    assert pipe.transformer.config.guidance_embeds == (kind in ("kontext", "fill"))
    if kind == "fill":
        latent = pipe.vae.config.latent_channels
        assert pipe.transformer.config.in_channels == 2 * 4 * latent + 4
        assert pipe.transformer.config.out_channels == 4 * latent


# ---------------------------------------------------------------------------------------------
# SD3 / SD3.5


@pytest.fixture(scope="module")
def sd3():
    return T.tiny_sd3_pipeline()


def test_sd3_topology(sd3):
    blocks = sd3.transformer.transformer_blocks
    assert len(blocks) >= 3
    assert [b.context_pre_only for b in blocks] == [False] * (len(blocks) - 1) + [True]
    assert _processors(sd3.transformer) == {"JointAttnProcessor2_0": len(blocks)}
    assert type(sd3.tokenizer).__name__ == "CLIPTokenizer" and sd3.tokenizer.pad_token_id == 49407
    assert sd3.tokenizer_2.pad_token_id == 0


def test_sd3_default_sequence_and_cfg_batch(sd3):
    seen = _denoiser_inputs(sd3)  # default 32 px, CFG, T5's 256 tokens after CLIP's 77
    assert tuple(seen["encoder_hidden_states"].shape) == (2, 77 + 256, sd3.transformer.config.joint_attention_dim)
    clip_width = sd3.text_encoder.config.hidden_size + sd3.text_encoder_2.config.hidden_size
    assert torch.all(seen["encoder_hidden_states"][:, :77, clip_width:] == 0)  # CLIP states zero-padded
    assert tuple(seen["pooled_projections"].shape) == (2, clip_width)


def test_sd3_generates_deterministically(sd3):
    first = _generate(sd3)
    assert first.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(first, _generate(sd3))


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_sd3_kinds_generate(kind):
    pipe = T.tiny_sd3_pipeline(kind)
    call = dict(image=_image(32), strength=1.0)
    if kind == "inpaint":
        call["mask_image"] = _mask(32)
    assert _generate(pipe, **call).shape == (1, 32, 32, 3)


def test_sd3_without_t5():
    pipe = T.tiny_sd3_pipeline(with_t5=False)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    seen = _denoiser_inputs(pipe)
    assert torch.all(seen["encoder_hidden_states"][:, 77:] == 0)  # T5's slots are zeros
    assert _generate(pipe).shape == (1, 32, 32, 3)


def test_sd35_dual_attention():
    pipe = T.tiny_sd35_pipeline()
    blocks = pipe.transformer.transformer_blocks
    dual = pipe.transformer.config.dual_attention_layers
    assert dual and all(blocks[i].use_dual_attention and blocks[i].attn2 is not None for i in dual)
    assert blocks[-1].context_pre_only and blocks[0].attn.norm_q is not None  # RMS q/k norms
    assert _processors(pipe.transformer) == {"JointAttnProcessor2_0": len(blocks) + len(dual)}
    out = _generate(pipe)
    np.testing.assert_array_equal(out, _generate(pipe))


# ---------------------------------------------------------------------------------------------
# PixArt-Sigma and Sana: cross-attention DiTs with a text mask


def _attn2_masks(pipe, **call):
    """Every ``attn2`` call's ``encoder_hidden_states`` width and attention mask, first step."""
    masks = []
    hooks = [
        block.attn2.register_forward_pre_hook(
            lambda m, a, k: masks.append((k["encoder_hidden_states"].shape, k.get("attention_mask"))), with_kwargs=True
        )
        for block in pipe.transformer.transformer_blocks
    ]
    try:
        seen = _denoiser_inputs(pipe, **call)
    finally:
        for hook in hooks:
            hook.remove()
    return seen, masks[: len(hooks)]


@pytest.mark.parametrize("family", ["pixart", "sana"])
def test_cross_attention_dits(family):
    if family == "pixart":
        pipe = T.tiny_pixart_pipeline()
        call = dict(height=32, width=32, use_resolution_binning=False, clean_caption=False)
        expected = {"AttnProcessor2_0": 2 * len(pipe.transformer.transformer_blocks)}
    else:
        pipe = T.tiny_sana_pipeline()
        call = dict(height=32, width=32, use_resolution_binning=False)
        n = len(pipe.transformer.transformer_blocks)
        expected = {"SanaLinearAttnProcessor2_0": n, "SanaAttnProcessor2_0": n}
    assert _processors(pipe.transformer) == expected
    assert all(block.attn2.is_cross_attention for block in pipe.transformer.transformer_blocks)
    seen, masks = _attn2_masks(pipe, **call)
    mask = seen["encoder_attention_mask"]
    assert tuple(mask.shape) == (2, 300)  # [negative; prompt], 300 tokens by default
    assert mask[0].sum() < mask[1].sum() < 300 and torch.all(mask[:, 0] == 1)  # pads masked, on the right
    for _, attn_mask in masks:  # every cross-attention sees the mask (as a bias on the pads)
        assert attn_mask is not None and attn_mask.shape[-1] == 300
    out = _generate(pipe, **call)
    assert out.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(out, _generate(pipe, **call))


# ---------------------------------------------------------------------------------------------
# builders: same seed, same weights; the caller's RNG untouched


@pytest.mark.parametrize("builder", ["tiny_flux_pipeline", "tiny_sd3_pipeline", "tiny_pixart_pipeline", "tiny_sana_pipeline"])
def test_dit_builders_are_seeded_and_leave_the_global_rng_alone(builder):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = getattr(T, builder)(seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = getattr(T, builder)(seed=3)
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb = (p.components[name].state_dict() for p in (a, b))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    if builder == "tiny_flux_pipeline":  # another seed, other weights
        other = T.tiny_flux_pipeline(seed=4).transformer.state_dict()
        assert not torch.equal(other["x_embedder.weight"], a.transformer.state_dict()["x_embedder.weight"])


# ---------------------------------------------------------------------------------------------
# UNet variants


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_controlnet_pipelines(family, multi):
    builder = T.tiny_sd_controlnet_pipeline if family == "sd" else T.tiny_sdxl_controlnet_pipeline
    pipe = builder(multi=multi)
    assert type(pipe.controlnet).__name__ == ("MultiControlNetModel" if multi else "ControlNetModel")
    image = [_image(8), _image(8, 1)] if multi else _image(8)
    out = _generate(pipe, image=image)
    assert out.shape == (1, 8, 8, 3)
    np.testing.assert_array_equal(out, _generate(pipe, image=image))


def test_t2i_adapter_pipeline():
    pipe = T.tiny_sd_t2i_adapter_pipeline()
    features = pipe.adapter(torch.zeros(1, 3, 8, 8))
    assert [f.shape[1] for f in features] == list(pipe.unet.config.block_out_channels)
    out = _generate(pipe, image=_image(8))
    assert out.shape == (1, 8, 8, 3)
    np.testing.assert_array_equal(out, _generate(pipe, image=_image(8)))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_pag_pipelines(family):
    pipe = T.tiny_sd_pag_pipeline() if family == "sd" else T.tiny_sdxl_pag_pipeline()
    before = _processors(pipe.unet)
    during = []

    def record(p, step, timestep, kwargs):
        during.append(_processors(p.unet))
        return kwargs

    seen = _denoiser_inputs(pipe, callback_on_step_end=record)
    assert seen["_args"][0].shape[0] == 3  # [uncond; cond; cond with perturbed self-attention]
    assert during[0].get("PAGCFGIdentitySelfAttnProcessor2_0", 0) > 0
    assert _processors(pipe.unet) == before  # PAG puts the processors back
    assert _generate(pipe).shape == (1, 8, 8, 3)


def test_with_lora_adds_real_peft_layers():
    from peft.tuners.lora import LoraLayer

    base = _generate(T.tiny_sd_pipeline())
    pipe = T.with_lora(T.tiny_sd_pipeline(), rank=4)
    attn2 = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert isinstance(attn2.to_k, LoraLayer) and attn2.to_k.r["default"] == 4
    assert isinstance(pipe.text_encoder.encoder.layers[0].self_attn.k_proj, LoraLayer)
    assert _processors(pipe.unet) == {"AttnProcessor2_0": 32}
    assert np.abs(_generate(pipe) - base).max() > 1e-3
    np.testing.assert_array_equal(_generate(pipe, cross_attention_kwargs={"scale": 0.0}), base)
    flux = T.with_lora(T.tiny_flux_pipeline())
    assert isinstance(flux.transformer.transformer_blocks[0].attn.to_k, LoraLayer)
    assert _generate(flux, height=32, width=32).shape == (1, 32, 32, 3)


def test_with_ip_adapter_runs_with_an_image():
    pipe = T.with_ip_adapter(T.tiny_sd_pipeline())
    procs = pipe.unet.attn_processors
    assert {type(p).__name__ for n, p in procs.items() if n.endswith("attn2.processor")} == {"IPAdapterAttnProcessor2_0"}
    assert {type(p).__name__ for n, p in procs.items() if n.endswith("attn1.processor")} == {"AttnProcessor2_0"}
    image = _image(32)
    out = _generate(pipe, ip_adapter_image=image)
    assert out.shape == (1, 8, 8, 3)
    pipe.set_ip_adapter_scale(0.0)
    np.testing.assert_array_equal(_generate(pipe, ip_adapter_image=image), _generate(T.tiny_sd_pipeline()))
    sdxl = T.with_ip_adapter(T.tiny_sdxl_pipeline())
    assert _generate(sdxl, ip_adapter_image=image).shape == (1, 8, 8, 3)


def test_with_flux_ip_adapter():
    pipe = T.with_flux_ip_adapter(T.tiny_flux_pipeline())
    assert _processors(pipe.transformer) == {"FluxIPAdapterAttnProcessor": 2, "FluxAttnProcessor": 2}
    assert _generate(pipe, height=32, width=32, ip_adapter_image=_image(32)).shape == (1, 32, 32, 3)


def test_with_fused_qkv():
    plain = _generate(T.tiny_sd_pipeline())
    pipe = T.with_fused_qkv(T.tiny_sd_pipeline())
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert hasattr(block.attn1, "to_qkv") and hasattr(block.attn2, "to_kv")
    assert _processors(pipe.unet) == {"FusedAttnProcessor2_0": 32}
    np.testing.assert_allclose(_generate(pipe), plain, atol=1e-5)
    flux = T.with_fused_qkv(T.tiny_flux_pipeline())
    assert flux.transformer.transformer_blocks[0].attn.fused_projections
    sd3 = T.with_fused_qkv(T.tiny_sd3_pipeline())
    assert _processors(sd3.transformer) == {"FusedJointAttnProcessor2_0": 3}
