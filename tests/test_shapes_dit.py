"""The transformer (SD3-family) shapes model: offline, real weights, stock pipeline."""

import math

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0

from gie_guard.shapes import load_detector, load_pipeline
from gie_guard.shapes import dit_model as dm


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(backbone="dit")


def test_default_backbone_is_still_the_unet():
    default = load_pipeline()
    assert type(default) is StableDiffusionPipeline
    assert default.unet is not None
    with pytest.raises(ValueError, match="backbone"):
        load_pipeline(backbone="flux")


def test_dit_pipeline_is_a_stock_sd3_pipeline(pipe):
    assert type(pipe) is StableDiffusion3Pipeline
    tr = pipe.transformer
    assert type(tr) is SD3Transformer2DModel
    assert tr.config.patch_size == 1 and tr.config.sample_size == 8  # 64 image tokens
    blocks = tr.transformer_blocks
    assert [b.context_pre_only for b in blocks] == [False] * (len(blocks) - 1) + [True]
    assert all(type(p) is JointAttnProcessor2_0 for p in tr.attn_processors.values())
    assert pipe.text_encoder_3 is None and pipe.tokenizer_max_length == 32
    assert pipe.vae.config.shift_factor == 0.0 and pipe.vae_scale_factor == 4
    # the sink vectors were trained: not their zero initial value, not equal to each other
    assert pipe.text_encoder.sink.norm() > 1 and not torch.equal(pipe.text_encoder.sink, pipe.text_encoder_2.sink)


def test_encode_prompt_as_diffusers_calls_it(pipe):
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            "a red circle", None, None, do_classifier_free_guidance=True, num_images_per_prompt=2
        )
        skip, _, _, _ = pipe.encode_prompt("a red circle", None, None, do_classifier_free_guidance=False, clip_skip=1)
    assert emb.shape == neg.shape == (2, 32 + 256, 768)
    assert pooled.shape == neg_pooled.shape == (2, 768) and pooled.abs().max() == 0
    sink = torch.cat([pipe.text_encoder.sink, pipe.text_encoder_2.sink])
    assert torch.equal(emb[0, 0], sink) and torch.equal(neg[0, 0], sink)
    assert emb[0, 1:4].norm(dim=-1).min() > 1  # "a", "red", "circle" carry MiniLM's states
    assert emb[0, 4:].abs().max() == 0 and neg[0, 1:].abs().max() == 0  # end, pads, T5 slot
    # clip_skip picks an earlier MiniLM layer for the real tokens only
    assert not torch.allclose(skip[0, 1:4], emb[0, 1:4]) and torch.equal(skip[0, 0], emb[0, 0])


def test_default_call_draws_the_prompt(pipe):
    image = pipe("a red circle", num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    found = load_detector()([image])[0]
    assert {"red", "circle"} <= found, found


def test_latent_output_has_the_latent_shape(pipe):
    out = pipe(["a blue star", "a green square"], num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(1)).images
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def _full_and_reduced(pipe, prompts, log_count_offset=0.0):
    torch.manual_seed(0)
    x = torch.randn(len(prompts), 4, 8, 8)
    t = torch.linspace(950, 30, len(prompts))
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        full = pipe.transformer(x, emb, pooled, t).sample  # stock processors, 288 text tokens
        _, features, real, start = dm.clip_slot(pipe, pipe.tokenizer, prompts)
        text = dm.reduce_text(features, real, start)
        text.log_count += log_count_offset
        with dm.reduced_length(pipe.transformer) as context:
            reduced = dm.reduced_forward(pipe.transformer, context, x, t, text, pooled)
    return full, reduced, text


def test_reduced_length_training_forward_equals_the_stock_full_length_forward(pipe):
    prompts = ["a red circle", "", "a picture of a striped navy box and a golden star with polka dots"]
    full, reduced, text = _full_and_reduced(pipe, prompts)
    assert text.states.shape[1] < 20  # the 288 text tokens folded to content + one
    assert math.isclose(text.log_count, math.log(32 + 256 - (text.states.shape[1] - 1)))
    # measured 1e-5 against outputs up to 8 (float32 rounding over 6 blocks)
    assert (full - reduced).abs().max() < 5e-5, (full - reduced).abs().max()
    # the log-count bias is what makes them equal: without it the outputs differ
    _, unbiased, _ = _full_and_reduced(pipe, prompts, log_count_offset=-text.log_count)
    assert (full - unbiased).abs().max() > 1e-2
    # and the stock processors are back
    assert all(type(p) is JointAttnProcessor2_0 for p in pipe.transformer.attn_processors.values())


def test_reduce_text_refuses_content_after_the_fold(pipe):
    _, features, real, start = dm.clip_slot(pipe, pipe.tokenizer, ["a red circle"])
    features[0, 10] = 1.0  # a non-zero state where only end/pad zeros may be
    with pytest.raises(ValueError, match="non-zero"):
        dm.reduce_text(features, real, start)


def test_training_command_writes_a_loadable_model(tmp_path):
    import json

    from gie_guard.shapes.train import main

    main(["--backbone", "dit", "--seed", "3", "--out", str(tmp_path), "--pool", "64", "--steps", "3",
          "--batch", "8", "--save-every", "2"])
    meta = json.loads((tmp_path / "dit_model.json").read_text())
    assert meta["steps"] == 3 and meta["backbone"] == "dit" and meta["text_leak"] is not None
    assert "saved EMA weights at step 2" in (tmp_path / "train.log").read_text()
    trained = load_pipeline(backbone="dit", weights_dir=tmp_path)
    shipped = load_pipeline(backbone="dit")
    # three steps from adaLN-Zero: a different model from the shipped one, same shapes
    assert not torch.equal(trained.transformer.proj_out.weight, shipped.transformer.proj_out.weight)
    out = trained("a red circle", num_inference_steps=2, output_type="latent").images
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


# measured on the shipped model for "a red circle" (docs/shapes.md): image keys 0.758,
# zero tokens 0.140, red 0.048, circle 0.040; locality red 2.26, circle 1.66; the
# no-content text queries pay < 5e-4 of their attention to real tokens
def test_joint_attention_keeps_the_concept_in_its_tokens_and_local(pipe):
    from gie_guard.shapes import dit_attention as da

    share = da.joint_attention_share(pipe, "a red circle")
    assert abs(sum(share.values()) - 1) < 1e-4, share
    assert share["image"] + share["clip pads"] + share["t5 slot"] + share["end"] + share["sink"] >= 0.8, share
    assert min(share["red"], share["circle"]) > 0.02, share
    local = da.joint_locality(pipe, "a red circle")
    assert local["red"] >= 1.5 and local["circle"] >= 1.3, local
    leak = da.text_leak(pipe, "a red circle")
    assert max(leak["sink"], leak["clip pads"], leak["t5 slot"]) < 0.01 < leak["real tokens"], leak
