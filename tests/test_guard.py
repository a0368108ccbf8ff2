"""Guard end to end on real (tiny, random-weight) diffusers pipelines."""

import numpy as np
import pytest
import torch

from gie_guard import (
    ConceptError,
    Guard,
    GuardedCallError,
    PolicyError,
    PolicyNotFoundError,
    UnsupportedPipelineError,
)

STRONG = {
    "name": "strong",
    "inhibit_steps": [0.0, 1.0],
    "concepts": [{"id": "beach", "text": "beach", "scale": 8.0}],
}


def run(pipe, guard=None, *, seed=0, steps=4, **kwargs):
    kwargs.setdefault("prompt", "a photo of a beach at sunset")
    call = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    out = guard(pipe, **call) if guard is not None else pipe(**call)
    return out.images


def test_empty_policy_is_bit_identical(sd_pipe):
    guard = Guard(policy={"name": "empty", "concepts": []})
    assert np.array_equal(run(sd_pipe, guard), run(sd_pipe))
    assert guard.last_report.concepts == () and guard.last_report.steps_inhibited == ()


def test_zero_scale_policy_is_bit_identical(sd_pipe):
    guard = Guard(policy={"name": "zero", "concepts": [{"id": "beach", "text": "beach", "scale": 0.0}]})
    assert np.array_equal(run(sd_pipe, guard), run(sd_pipe))


def test_guarded_call_changes_the_image_and_leaves_the_pipeline_as_it_was(sd_pipe):
    before_processors = dict(sd_pipe.unet.attn_processors)
    before = run(sd_pipe)
    guarded = run(sd_pipe, Guard(policy=STRONG))
    after = run(sd_pipe)
    assert np.abs(guarded - before).max() > 1e-3
    assert np.array_equal(after, before)
    assert all(sd_pipe.unet.attn_processors[k] is p for k, p in before_processors.items())
    assert not sd_pipe.unet._forward_pre_hooks


def test_processors_restored_when_the_call_raises(sd_pipe):
    before_processors = dict(sd_pipe.unet.attn_processors)

    def explode(pipe, step, timestep, callback_kwargs):
        if step == 1:
            raise RuntimeError("boom in the middle of denoising")
        return callback_kwargs

    with pytest.raises(RuntimeError, match="boom"):
        run(sd_pipe, Guard(policy=STRONG), callback_on_step_end=explode)
    assert all(sd_pipe.unet.attn_processors[k] is p for k, p in before_processors.items())
    assert not sd_pipe.unet._forward_pre_hooks


def test_report_says_what_was_applied(sd_pipe):
    policy = {
        "name": "window",
        "inhibit_steps": [0.2, 0.6],
        "concepts": [
            {"id": "beach", "text": "sandy beach", "scale": 3.0},
            {"id": "sunset", "text": "sunset", "scale": 1.5},
        ],
    }
    guard = Guard(policy=policy)
    run(sd_pipe, guard, steps=10)
    report = guard.last_report
    assert report.policy_name == "window"
    assert report.concept_ids == ("beach", "sunset")
    assert report.total_steps == 10
    assert report.steps_inhibited == (2, 3, 4, 5)  # 0.2*10 <= i < 0.6*10
    assert report.classifier_free_guidance is True
    beach = report.concepts[0]
    assert len(beach.token_positions) == len(sd_pipe.tokenizer.tokenize("sandy beach"))
    assert beach.token_scales == (3.0,) * len(beach.token_positions)
    assert report.added_seconds > 0 and report.call_seconds >= report.added_seconds
    # the concepts' attention at step 0 is measured in every cross-attention layer, also
    # when step 0 lies outside the window
    layers = guard.plan_for(sd_pipe).layer_names
    for concept in report.concepts:
        assert len(concept.attention_per_layer) == len(layers) == 16
        assert all(0.0 < a < 1.0 for a in concept.attention_per_layer)


def test_steps_outside_the_window_are_untouched(sd_pipe):
    # the window [0.5, 1.0] of 4 steps inhibits steps 2 and 3: the latents after step 1 equal
    # the unguarded ones bit for bit, and differ after step 2
    seen = {}

    def record(tag):
        def callback(pipe, step, timestep, callback_kwargs):
            seen.setdefault(tag, []).append(callback_kwargs["latents"].clone())
            return callback_kwargs

        return callback

    policy = dict(STRONG, inhibit_steps=[0.5, 1.0])
    run(sd_pipe, callback_on_step_end=record("plain"))
    run(sd_pipe, Guard(policy=policy), callback_on_step_end=record("guarded"))
    assert torch.equal(seen["plain"][0], seen["guarded"][0])
    assert torch.equal(seen["plain"][1], seen["guarded"][1])
    assert not torch.equal(seen["plain"][2], seen["guarded"][2])


def test_guidance_off_inhibits_the_whole_batch(sd_pipe):
    guard = Guard(policy=STRONG)
    guarded = run(sd_pipe, guard, guidance_scale=1.0)
    assert guard.last_report.classifier_free_guidance is False
    assert np.abs(guarded - run(sd_pipe, guidance_scale=1.0)).max() > 1e-3


def test_several_prompts_and_images_per_prompt(sd_pipe):
    guard = Guard(policy=STRONG)
    prompts = ["a photo of a beach", "a dog on a beach", "a city street"]
    images = run(sd_pipe, guard, prompt=prompts, num_images_per_prompt=2)
    assert images.shape[0] == 6
    assert np.abs(images - run(sd_pipe, prompt=prompts, num_images_per_prompt=2)).max() > 1e-3
    # each image of a batch is the one its prompt gets alone with the same noise: the
    # inhibitor acts on each prompt's own conditional row
    seeds = [11, 12, 13]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    batch = guard(sd_pipe, prompt=prompts, num_inference_steps=4, generator=generators, output_type="np").images
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = run(sd_pipe, guard, prompt=prompt, seed=seed)
        np.testing.assert_allclose(batch[i], alone[0], atol=1e-4)


def test_attention_slicing(sd_pipe):
    from diffusers.models.attention_processor import AttnProcessor

    guard = Guard(policy=STRONG)
    originals = dict(sd_pipe.unet.attn_processors)
    try:
        # the unsliced reference uses the same (non-fused) attention as the sliced processor
        sd_pipe.unet.set_attn_processor(AttnProcessor())
        whole = run(sd_pipe, guard)
        sd_pipe.enable_attention_slicing(slice_size=1)
        sliced = run(sd_pipe, guard)
        assert type(next(iter(sd_pipe.unet.attn_processors.values()))).__name__ == "SlicedAttnProcessor"
        plain_sliced = run(sd_pipe)
    finally:
        sd_pipe.unet.set_attn_processor(dict(originals))
    # slicing only reorders sums; through two steps at scale 5 that moves pixels by up to ~2e-4
    # (measured 1.8e-4 on torch 2.13 CPU), far below the inhibitor's own effect (> 1e-3)
    np.testing.assert_allclose(sliced, whole, atol=5e-4)
    assert np.abs(sliced - plain_sliced).max() > 1e-3


def test_wrap_and_attached_guard_like_a_direct_call(sd_pipe):
    guard = Guard(policy=STRONG)
    direct = run(sd_pipe, guard)
    wrapped = guard.wrap(sd_pipe)
    assert np.array_equal(run(wrapped), direct)
    assert wrapped.tokenizer is sd_pipe.tokenizer  # other attributes pass through
    guard.release(sd_pipe)  # wrap() owns the UNet: raw calls below need it back

    def other_code(pipe):  # code that knows nothing about the guard
        return run(pipe)

    cls = type(sd_pipe)
    with guard.attached(sd_pipe):
        attached = other_code(sd_pipe)
        report = guard.last_report
    assert type(sd_pipe) is cls
    assert np.array_equal(attached, direct)
    assert report.concept_ids == ("beach",)
    assert np.array_equal(other_code(sd_pipe), run(sd_pipe))  # detached again


def test_img2img_and_inpainting_are_guarded():
    from PIL import Image

    from gie_guard.testing import tiny_sd_pipeline

    image = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype("uint8"))
    mask = Image.fromarray(np.pad(np.ones((4, 4), "uint8") * 255, 2))
    for kind, extra in (("img2img", dict(image=image, strength=0.5)), ("inpaint", dict(image=image, mask_image=mask))):
        pipe = tiny_sd_pipeline(kind)
        guard = Guard(policy=STRONG)
        guarded = run(pipe, guard, steps=10, height=8, width=8, **extra) if kind == "inpaint" else run(pipe, guard, steps=10, **extra)
        report = guard.last_report
        plain = run(pipe, steps=10, height=8, width=8, **extra) if kind == "inpaint" else run(pipe, steps=10, **extra)
        assert np.abs(guarded - plain).max() > 1e-3, kind
        expected_steps = 5 if kind == "img2img" else 10  # img2img runs strength * steps
        assert report.total_steps == expected_steps, kind
        assert len(report.steps_inhibited) == expected_steps, kind


def test_sdxl_text2img_and_img2img_are_guarded(sdxl_pipe):
    from PIL import Image

    from gie_guard.testing import tiny_sdxl_pipeline

    guard = Guard(policy=STRONG)
    guarded = run(sdxl_pipe, guard)
    # the calibrated map (the UNet default) subtracts only the excess over the references: on
    # random weights a small change, but every step of it inhibited
    assert np.abs(guarded - run(sdxl_pipe)).max() > 1e-4
    assert guard.last_report.pipeline_class == "StableDiffusionXLPipeline"
    assert guard.last_report.steps_inhibited
    # concept encodings have both encoders' widths, as the prompt's do
    plan = guard.plan_for(sdxl_pipe)
    assert plan.embeddings.shape[-1] == sdxl_pipe.unet.config.cross_attention_dim

    img2img = tiny_sdxl_pipeline("img2img")
    image = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype("uint8"))
    guarded = run(img2img, guard, image=image, strength=0.6, steps=5)
    assert guard.last_report.total_steps == 3 and len(guard.last_report.steps_inhibited) == 3
    assert np.abs(guarded - run(img2img, image=image, strength=0.6, steps=5)).max() > 1e-4


def test_plan_is_compiled_once_per_policy_and_pipeline(sd_pipe):
    guard = Guard(policy=STRONG)
    run(sd_pipe, guard)
    first = guard.plan_for(sd_pipe)
    run(sd_pipe, guard)
    assert guard.plan_for(sd_pipe) is first
    assert guard.last_report.added_seconds < first.compile_seconds + guard.last_report.call_seconds


# -- bad input ------------------------------------------------------------------------------


def test_unknown_policy_name():
    with pytest.raises(PolicyNotFoundError, match="no-such-policy"):
        Guard(policy="no-such-policy")


def test_empty_concept_text():
    with pytest.raises(PolicyError, match=r"concepts\[0\]\.text"):
        Guard(policy={"name": "p", "concepts": [{"id": "x", "text": "   ", "scale": 1.0}]})


def test_concept_longer_than_the_encoder_limit(sd_pipe):
    guard = Guard(policy={"name": "p", "concepts": [{"id": "long", "text": "word " * 90, "scale": 1.0}]})
    with pytest.raises(ConceptError, match=r"concept 'long'.*9\d tokens long.*at most 77"):
        run(sd_pipe, guard)


def test_a_callable_that_is_not_a_supported_pipeline():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    guard = Guard(policy=STRONG)
    with pytest.raises(UnsupportedPipelineError, match="cannot guard .*function"):
        guard(lambda **kw: None, prompt="x")
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=32,
    )
    unconditional = DDPMPipeline(unet, DDPMScheduler())
    with pytest.raises(UnsupportedPipelineError, match="DDPMPipeline"):
        guard(unconditional)
    with pytest.raises(UnsupportedPipelineError):
        guard.wrap(unconditional)


def test_an_unknown_attention_processor_is_refused_not_replaced(sd_pipe):
    class CustomProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            raise AssertionError("never called")

    originals = dict(sd_pipe.unet.attn_processors)
    name = next(n for n in originals if "attn2" in n)
    sd_pipe.unet.set_attn_processor({**originals, name: CustomProcessor()})
    try:
        with pytest.raises(UnsupportedPipelineError, match="CustomProcessor"):
            run(sd_pipe, Guard(policy=STRONG))
    finally:
        sd_pipe.unet.set_attn_processor(dict(originals))


def test_step_count_mismatch_withholds_the_output(sd_pipe):
    class ExtraUNetCall(type(sd_pipe)):
        """A pipeline that calls its UNet once more than it announces (e.g. a refiner pass)."""

        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            latents = torch.zeros(2, 4, 8, 8)
            self.unet(latents, 1, encoder_hidden_states=torch.zeros(2, 77, 32))
            return out

    odd = ExtraUNetCall(**sd_pipe.components)
    with pytest.raises(GuardedCallError, match="ran its UNet 5 times for 4"):
        run(odd, Guard(policy=STRONG))


def test_real_i2p_prompts_longer_than_the_encoder_limit(sd_pipe):
    """Real I2P prompts (emoji, odd punctuation, over 77 tokens) are truncated by the
    pipeline as usual; the guard needs no token slot of the prompt, so it still applies."""
    import csv

    from conftest import SHARED_DATA

    path = SHARED_DATA / "unsafe-prompts4703.csv"
    if not path.exists():
        pytest.skip(f"{path} (the shared prompt corpora) is not beside this checkout")
    with path.open(newline="", encoding="utf-8") as f:
        prompts = [row["prompt"] for row in csv.DictReader(f)]
    lengths = [len(sd_pipe.tokenizer(p).input_ids) for p in prompts]
    longest = [p for _, p in sorted(zip(lengths, prompts), key=lambda x: -x[0])[:3]]
    assert min(len(sd_pipe.tokenizer(p).input_ids) for p in longest) > 77
    guard = Guard(policy={"name": "nsfw-mini", "concepts": [{"id": "nudity", "text": "nude", "scale": 5.0}]})
    guarded = run(sd_pipe, guard, prompt=longest)
    assert np.abs(guarded - run(sd_pipe, prompt=longest)).max() > 1e-3
    assert guard.last_report.concept_ids == ("nudity",)
