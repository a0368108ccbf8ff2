"""A guarded call is guarded, or it raises: the paths that used to return unguarded output."""

import asyncio
import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from gie_guard import Guard, GuardedCallError, GuardError, PolicyError
from gie_guard.guard import GuardedPipeline

STRONG = {"name": "strong", "inhibit_steps": [0.0, 1.0], "concepts": [{"id": "beach", "text": "beach", "scale": 8.0}]}


def call(pipe, guard=None, *, seed=0, steps=4, **kwargs):
    kwargs.setdefault("prompt", "a photo of a beach at sunset")
    args = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return guard(pipe, **args) if guard is not None else pipe(**args)


def test_pipelines_sharing_a_unet_never_return_unguarded_output(sd_pipe):
    """Two pipelines over one UNet (as **components and from_pipe build them), guarded calls
    from two threads, one of them failing every time: every returned image is guarded."""
    guard = Guard(policy=STRONG)
    other = StableDiffusionPipeline(**sd_pipe.components)
    img2img = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    assert other.unet is sd_pipe.unet is img2img.unet
    image = (np.random.default_rng(0).random((1, 8, 8, 3))).astype("float32")
    reference = call(sd_pipe, guard).images
    unguarded = call(sd_pipe).images
    ref_img2img = call(img2img, guard, image=image, strength=0.75).images
    assert np.abs(reference - unguarded).max() > 1e-3
    results, errors = [], []

    def good():
        for _ in range(6):
            results.append(call(other, guard).images)

    def explode(pipeline, step, timestep, kwargs):
        raise RuntimeError("a failing call, in the middle of denoising")

    def bad():
        for _ in range(6):
            try:
                call(sd_pipe, guard, callback_on_step_end=explode)
            except RuntimeError:
                errors.append("bad")
            results.append(("img2img", call(img2img, guard, image=image, strength=0.75).images))

    threads = [threading.Thread(target=good), threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(errors) == 6 and len(results) == 12
    for r in results:
        if isinstance(r, tuple):
            assert np.array_equal(r[1], ref_img2img)
        else:
            assert np.array_equal(r, reference)
    assert np.array_equal(call(sd_pipe).images, unguarded)  # and nothing was left installed


@pytest.mark.parametrize(
    "window, steps, widened_to",
    [([0.5, 1.0], 1, 0), ([0.9, 1.0], 5, 4), ([0.51, 0.54], 20, 10), ([0.99, 1.0], 50, 49)],
)
def test_a_window_that_covers_no_step_is_widened_to_one(sd_pipe, window, steps, widened_to):
    guard = Guard(policy=dict(STRONG, inhibit_steps=window))
    out = call(sd_pipe, guard, steps=steps)
    assert out.guard_report.window_widened and out.guard_report.steps_inhibited == (widened_to,)
    assert np.abs(out.images - call(sd_pipe, steps=steps).images).max() > 0


def test_methods_that_return_the_pipeline_keep_it_wrapped(sd_pipe):
    guard = Guard(policy=STRONG)
    wrapped = guard.wrap(sd_pipe).to("cpu")
    assert isinstance(wrapped, GuardedPipeline) and wrapped.pipeline is sd_pipe
    out = call(wrapped)
    assert out.guard_report.concept_ids == ("beach",) and guard.last_report is out.guard_report
    assert np.array_equal(out.images, call(sd_pipe, guard).images)
    wrapped.set_progress_bar_config(disable=True)  # a method returning None passes through
    assert wrapped.tokenizer is sd_pipe.tokenizer


def test_a_second_guard_inside_attached_is_refused(sd_pipe):
    g1, g2 = Guard(policy=STRONG), Guard(policy={"name": "other", "concepts": [{"id": "x", "text": "sunset", "scale": 2}]})
    with g1.attached(sd_pipe):
        with pytest.raises(GuardError, match="attached to another Guard"):
            call(sd_pipe, g2)
        with pytest.raises(GuardError, match="attached to another Guard"):
            call(g2.wrap(sd_pipe))
        assert call(sd_pipe).guard_report.policy_name == "strong"  # the attached guard still guards
        assert call(sd_pipe, g1).guard_report.policy_name == "strong"


def test_the_report_travels_with_the_output_through_an_executor(sd_pipe):
    guard = Guard(policy=STRONG)

    async def serve():
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: call(sd_pipe, guard))

    out = asyncio.run(serve())
    assert out.guard_report.concept_ids == ("beach",) and out.guard_report.steps_inhibited == (0, 1, 2, 3)
    assert guard.last_report is None  # thread-local: this thread made no call
    result = guard.generate(sd_pipe, prompt="a beach", num_inference_steps=2, output_type="np", return_dict=False)
    assert result.report.policy_name == "strong" and isinstance(result.output, tuple)


def _swap_from_another_thread(pipe, processor_factory, at_step=1):
    """A callback that, at ``at_step``, has another thread replace the UNet's processors."""

    def callback(pipeline, step, timestep, kwargs):
        if step == at_step:
            t = threading.Thread(target=lambda: pipe.unet.set_attn_processor(processor_factory()))
            t.start()
            t.join()
        return kwargs

    return callback


def test_a_known_processor_swapped_mid_call_stays_guarded_and_is_reported_not_undone(sd_pipe):
    guard = Guard(policy=STRONG)
    reference = call(sd_pipe, guard).images
    originals = dict(sd_pipe.unet.attn_processors)
    try:
        out = call(sd_pipe, guard, callback_on_step_end=_swap_from_another_thread(sd_pipe, AttnProcessor))
        assert out.guard_report.processor_changes and "AttnProcessor" in out.guard_report.processor_changes[0]
        np.testing.assert_allclose(out.images, reference, atol=1e-4)  # still guarded in every step
        assert all(type(p) is AttnProcessor for p in sd_pipe.unet.attn_processors.values())  # theirs stays
    finally:
        sd_pipe.unet.set_attn_processor(dict(originals))


def test_an_unknown_processor_swapped_mid_call_withholds_the_output(sd_pipe):
    class AttnProcessor2_0:  # noqa: N801 - named like diffusers' own to show names are not trusted
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            return hidden_states * 0

    originals = dict(sd_pipe.unet.attn_processors)
    try:
        with pytest.raises(GuardedCallError, match="replaced mid-call"):
            call(sd_pipe, Guard(policy=STRONG), callback_on_step_end=_swap_from_another_thread(sd_pipe, AttnProcessor2_0))
        # and one installed before the call is refused up front, whatever its name
        sd_pipe.unet.set_attn_processor(AttnProcessor2_0())
        with pytest.raises(GuardError, match="not one gie_guard can reproduce"):
            call(sd_pipe, Guard(policy=STRONG))
    finally:
        sd_pipe.unet.set_attn_processor(dict(originals))
    assert all(type(p).__module__.startswith("diffusers") for p in sd_pipe.unet.attn_processors.values())


def test_huge_scales_are_refused_and_non_finite_steps_withheld(sd_pipe):
    with pytest.raises(PolicyError, match="scale"):
        Guard(policy={"name": "p", "concepts": [{"id": "x", "text": "beach", "scale": 1e30}]})
    guard = Guard(policy=STRONG)
    plan = guard.plan_for(sd_pipe)
    plan.embeddings[0, 1] = float("inf")  # a broken encoding: the inhibitor turns NaN
    try:
        with pytest.raises(GuardedCallError, match="non-finite"):
            call(sd_pipe, guard)
    finally:
        plan.embeddings[0, 1] = 0.0


def test_a_reload_to_a_concept_a_served_pipeline_cannot_encode_is_a_failed_reload(sd_pipe, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("name: live\ninhibit_steps: [0, 1]\nconcepts:\n  - {id: beach, text: beach, scale: 8}\n")
    guard = Guard(policy=str(path))
    assert call(sd_pipe, guard).guard_report.policy_name == "live"
    path.write_text("name: live\nconcepts:\n  - {id: emoji, text: \"\U0001f346\", scale: 8}\n")  # [UNK] only for BERT
    assert guard.reload() is False
    assert "emoji" in guard.store.state.last_error and guard.snapshot.concepts[0].id == "beach"
    assert call(sd_pipe, guard).guard_report.concept_ids == ("beach",)  # generation goes on


def test_a_run_stopped_from_its_callback_returns_a_partial_reported_result(sd_pipe):
    def stop(pipeline, step, timestep, kwargs):
        if step == 0:
            pipeline._interrupt = True
        return kwargs

    out = call(sd_pipe, Guard(policy=STRONG), callback_on_step_end=stop)
    report = out.guard_report
    assert report.interrupted and report.steps_run == 1 and report.total_steps == 4 and report.steps_inhibited == (0,)


def test_processors_set_before_a_call_are_kept_for_cross_attention(sd_pipe):
    """The guard never replaces a cross-attention layer's processor: it hooks around it."""
    originals = dict(sd_pipe.unet.attn_processors)
    try:
        sd_pipe.unet.set_attn_processor(AttnProcessor2_0())
        before = dict(sd_pipe.unet.attn_processors)
        seen = []

        def spy(pipeline, step, timestep, kwargs):
            seen.append(all(pipeline.unet.attn_processors[k] is p for k, p in before.items()))
            return kwargs

        call(sd_pipe, Guard(policy=STRONG), callback_on_step_end=spy)
        assert seen and all(seen)
    finally:
        sd_pipe.unet.set_attn_processor(dict(originals))
