"""The guard owns the denoiser (issue: fail closed by construction). Once a pipeline is
wrapped or attached, every path to its denoiser either runs guarded or raises
UnguardedUseError: from_pipe (the wrapper's, the class's, AutoPipeline's, inside attached),
**components, copies, a hand-written loop, accelerate's hooks. Releasing gives it back."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from gie_guard import Guard, GuardedPipeline, GuardError, UnguardedUseError, UnsupportedPipelineError
from gie_guard.engine import ownership

STRONG = {"name": "strong", "concepts": [{"id": "beach", "text": "beach", "scale": 5.0}]}


def run(pipe, **kwargs):
    return pipe(prompt="a beach", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


def raw_unet_call(pipe):
    unet = pipe.unet
    sample = torch.zeros(1, unet.config.in_channels, 8, 8)
    text = torch.zeros(1, 77, unet.config.cross_attention_dim)
    return unet(sample, 1, text)


@pytest.fixture
def pipe():
    from gie_guard.testing import tiny_sd_pipeline

    return tiny_sd_pipeline()


@pytest.fixture
def unguarded(pipe):
    return run(pipe)


@pytest.fixture
def guard():
    g = Guard(policy=STRONG)
    yield g
    g.close()


def test_wrapping_owns_the_denoiser_until_released(pipe, unguarded, guard):
    wrapped = guard.wrap(pipe)
    guarded = run(wrapped)
    assert np.abs(guarded - unguarded).max() > 1e-3
    with pytest.raises(UnguardedUseError, match="owned by a Guard"):
        run(pipe)
    with pytest.raises(UnguardedUseError):
        raw_unet_call(pipe)
    with pytest.raises(UnguardedUseError):
        pipe.unet.forward(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 77, pipe.unet.config.cross_attention_dim))
    assert guard.owns(pipe) and guard.owns(wrapped)
    guard.release(wrapped)
    assert not guard.owns(pipe) and not ownership.is_owned(pipe.unet)
    assert "forward" not in pipe.unet.__dict__  # the model's own forward is back
    assert np.array_equal(run(pipe), unguarded)
    assert np.array_equal(run(wrapped), guarded)  # the wrapper still guards


def test_every_pipeline_made_from_a_wrapped_one_is_guarded_or_refuses(pipe, unguarded, guard):
    from diffusers import AutoPipelineForText2Image, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    wrapped = guard.wrap(pipe)
    guarded = run(wrapped)
    made = wrapped.from_pipe()
    assert type(made) is GuardedPipeline and made.pipeline is not pipe and made.unet is pipe.unet
    assert np.array_equal(run(made), guarded)
    assert isinstance(wrapped, StableDiffusionPipeline)  # isinstance sees the pipeline
    for build in (
        lambda: StableDiffusionPipeline.from_pipe(wrapped),
        lambda: AutoPipelineForText2Image.from_pipe(wrapped),
        lambda: StableDiffusionPipeline(**pipe.components),
        lambda: StableDiffusionPipeline(**wrapped.components),
    ):
        other = build()
        assert other.unet is pipe.unet
        with pytest.raises(UnguardedUseError):
            run(other)
    image = np.random.default_rng(0).random((1, 8, 8, 3)).astype("float32")
    with pytest.raises(UnguardedUseError):
        StableDiffusionImg2ImgPipeline.from_pipe(wrapped)(
            prompt="a beach", image=image, strength=0.75, num_inference_steps=2, output_type="np")
    assert np.array_equal(run(guard.wrap(StableDiffusionPipeline.from_pipe(wrapped))), guarded)


def test_copies_of_a_wrapped_pipeline_are_guarded_and_pickling_is_refused(pipe, unguarded, guard):
    wrapped = guard.wrap(pipe)
    guarded = run(wrapped)
    shallow = copy.copy(wrapped)
    assert type(shallow) is GuardedPipeline and shallow.pipeline is pipe
    deep = copy.deepcopy(wrapped)
    assert type(deep) is GuardedPipeline and deep.pipeline.unet is not pipe.unet
    assert np.array_equal(run(shallow), guarded) and np.array_equal(run(deep), guarded)
    with pytest.raises(UnguardedUseError):
        run(deep.pipeline)  # the copy's denoiser is owned too
    with pytest.raises(GuardError, match="cannot be pickled"):
        pickle.dumps(wrapped)
    raw_copy = copy.deepcopy(pipe)  # a copy of an owned model is owned by the same guard
    with pytest.raises(UnguardedUseError):
        run(raw_copy)
    guard.close()  # a closed guard owns nothing anywhere, copies included
    assert np.array_equal(run(raw_copy), unguarded) and np.array_equal(run(pipe), unguarded)


def test_attached_refuses_hand_written_loops_and_from_pipe_and_gives_back_on_exit(pipe, unguarded, guard):
    from diffusers import StableDiffusionPipeline

    cls = type(pipe)
    with guard.attached(pipe):
        guarded = run(pipe)
        assert np.abs(guarded - unguarded).max() > 1e-3
        with pytest.raises(UnguardedUseError):
            raw_unet_call(pipe)
        with pytest.raises(UnguardedUseError):
            run(StableDiffusionPipeline.from_pipe(pipe))
        kept = copy.copy(pipe)  # a copy made inside keeps the guarded class
        with pytest.raises(GuardError, match="cannot be pickled"):
            pickle.dumps(pipe)
    assert type(pipe) is cls and not guard.owns(pipe)
    assert np.array_equal(run(pipe), unguarded)
    assert np.array_equal(run(kept), guarded)


def test_a_pipeline_already_wrapped_stays_owned_after_attached(pipe, guard):
    guard.wrap(pipe)
    with guard.attached(pipe):
        pass
    with pytest.raises(UnguardedUseError):
        run(pipe)


def test_exclusive_false_leaves_the_raw_pipeline_usable(pipe, unguarded):
    guard = Guard(policy=STRONG, exclusive=False)
    wrapped = guard.wrap(pipe)
    assert np.abs(run(wrapped) - unguarded).max() > 1e-3
    assert np.array_equal(run(pipe), unguarded)
    owned = Guard(policy=STRONG).wrap(pipe, exclusive=True)
    with pytest.raises(UnguardedUseError):
        run(pipe)
    owned.guard.close()
    with pytest.raises(GuardError, match="closed"):
        owned.guard.wrap(pipe)


def test_a_denoiser_swapped_in_after_wrap_is_owned_at_the_next_call(pipe, guard):
    wrapped = guard.wrap(pipe)
    old = pipe.unet
    pipe.unet = copy.deepcopy(old)
    ownership.release(pipe.unet, next(iter(ownership.owners_of(pipe.unet))))  # a fresh, unowned model
    assert not ownership.is_owned(pipe.unet)
    run(wrapped)
    assert ownership.is_owned(pipe.unet) and ownership.is_owned(old)
    guard.release(pipe)
    assert not ownership.is_owned(pipe.unet) and not ownership.is_owned(old)


def test_accelerate_hooks_on_an_owned_denoiser_still_end_in_the_check(pipe, unguarded, guard):
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    add_hook_to_module(pipe.unet, Counting())  # before the guard owns it (as enable_*_offload do)
    wrapped = guard.wrap(pipe)
    guarded = run(wrapped)
    assert Counting.calls == 2 and np.abs(guarded - unguarded).max() > 1e-3
    with pytest.raises(UnguardedUseError):
        run(pipe)
    add_hook_to_module(pipe.unet, Counting(), append=True)  # and after
    with pytest.raises(UnguardedUseError):
        run(pipe)
    assert np.array_equal(run(wrapped), guarded)
    guard.release(pipe)
    assert np.array_equal(run(pipe), unguarded)
    remove_hook_from_module(pipe.unet)
    assert np.array_equal(run(pipe), unguarded)


def test_controlnets_are_owned_with_the_denoiser():
    from gie_guard.testing.variants import tiny_sd_controlnet_pipeline

    pipe = tiny_sd_controlnet_pipeline()
    guard = Guard(policy=STRONG)
    guard.wrap(pipe)
    image = torch.zeros(1, 3, 32, 32)
    with pytest.raises(UnguardedUseError):
        pipe.controlnet(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 77, pipe.unet.config.cross_attention_dim),
                        controlnet_cond=image)
    guard.close()


def test_compiled_in_place_and_fused_pixart_are_refused_before_the_first_step(pipe, guard):
    from gie_guard.testing import tiny_pixart_pipeline

    pipe.unet.compile()
    with pytest.raises(UnsupportedPipelineError, match="torch.compile"):
        guard.wrap(pipe)
    with pytest.raises(UnsupportedPipelineError, match="torch.compile"):
        guard(pipe, prompt="a beach", num_inference_steps=2)
    pixart = tiny_pixart_pipeline()
    pixart.transformer.fuse_qkv_projections()
    steps = []
    with pytest.raises(UnsupportedPipelineError, match="fused QKV"):
        guard.wrap(pixart)
    with pytest.raises(UnsupportedPipelineError, match="fused QKV"):
        guard(pixart, prompt="a beach", num_inference_steps=2, output_type="np",
              callback_on_step_end=lambda *a: steps.append(a[1]) or {})
    assert steps == []


def test_offloaded_pipelines_stay_owned_and_guarded(pipe, unguarded, guard):
    """diffusers' model offload removes and re-adds accelerate's hooks on every model, after
    the guard owns them or before: either way raw calls are refused and guarded ones guarded.
    (enable_sequential_cpu_offload cannot run on this CPU-only torch even unguarded: accelerate
    fails re-creating parameters; its hooks are the same kind, covered here and above.)"""
    wrapped = guard.wrap(pipe)
    guarded = run(wrapped)
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(UnguardedUseError):
        run(pipe)
    np.testing.assert_allclose(run(wrapped), guarded, atol=1e-5)
    guard.release(pipe)
    np.testing.assert_allclose(run(pipe), unguarded, atol=1e-5)
    rewrapped = guard.wrap(pipe)  # owned again with the offload hooks already in place
    with pytest.raises(UnguardedUseError):
        run(pipe)
    np.testing.assert_allclose(run(rewrapped), guarded, atol=1e-5)


def test_an_sdxl_refiner_on_the_base_components_is_owned_and_one_with_its_own_unet_is_not(sdxl_pipe):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    guard = Guard(policy=STRONG)
    guard.wrap(sdxl_pipe)
    image = np.random.default_rng(0).random((1, 8, 8, 3)).astype("float32")
    args = dict(prompt="a beach", image=image, strength=0.75, num_inference_steps=2, output_type="np")
    shared = StableDiffusionXLImg2ImgPipeline(**sdxl_pipe.components)
    with pytest.raises(UnguardedUseError):
        shared(**args)
    own_unet = StableDiffusionXLImg2ImgPipeline(**{**sdxl_pipe.components, "unet": copy.deepcopy(sdxl_pipe.unet)})
    ownership.release(own_unet.unet, next(iter(ownership.owners_of(own_unet.unet))))  # a separately loaded UNet
    assert own_unet(**args).images.shape[0] == 1  # a denoiser of its own is a pipeline of its own: wrap it too
    assert guard.wrap(own_unet)(**args).guard_report.steps_inhibited
    guard.close()


def test_a_guard_that_is_gone_owns_nothing():
    """In a process of its own, so that no other test's leftovers (frames kept by tracebacks,
    captured records) can keep the guard alive."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import gc, torch
        from gie_guard import Guard, UnguardedUseError
        from gie_guard.engine import ownership
        from gie_guard.testing import tiny_sd_pipeline

        torch.set_num_threads(1)
        pipe = tiny_sd_pipeline()

        def wrap_and_drop():
            Guard(policy={STRONG!r}).wrap(pipe)  # the wrapper was the only reference to its guard
            assert ownership.is_owned(pipe.unet)

        wrap_and_drop()
        gc.collect()
        assert not ownership.is_owned(pipe.unet), "a guard nobody holds still owns the UNet"
        pipe(prompt="a beach", num_inference_steps=1, output_type="np")
        print("released")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "released" in done.stdout, done.stderr[-2000:]


def test_a_model_saved_while_owned_loads_as_a_new_unowned_model(pipe, guard):
    import io

    guard.wrap(pipe)
    buffer = io.BytesIO()
    torch.save(pipe.unet, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not ownership.is_owned(loaded)
    assert raw_unet_call(type("P", (), {"unet": loaded})()).sample.shape[0] == 1
    with pytest.raises(UnguardedUseError):
        raw_unet_call(pipe)  # the original stays owned


def test_another_thread_cannot_use_the_denoiser_while_a_guarded_call_runs(pipe, guard):
    import threading

    wrapped = guard.wrap(pipe)
    inside, done = threading.Event(), threading.Event()
    outcome = []

    def pause(pipeline, step, timestep, kwargs):
        if step == 0:
            inside.set()
            done.wait(60)
        return {}

    def other():
        inside.wait(60)
        try:
            raw_unet_call(pipe)  # while the guarded call is inside its denoising loop
            outcome.append("ran")
        except UnguardedUseError:
            outcome.append("refused")
        finally:
            done.set()

    thread = threading.Thread(target=other)
    thread.start()
    out = run(wrapped, callback_on_step_end=pause)
    thread.join(60)
    assert outcome == ["refused"] and out.shape[0] == 1


def test_a_guard_called_on_a_wrapper_guards_its_pipeline_or_refuses_anothers(pipe, guard):
    wrapped = guard.wrap(pipe)
    guarded = run(wrapped)
    assert np.array_equal(guard(wrapped, prompt="a beach", num_inference_steps=2,
                                generator=torch.Generator().manual_seed(0), output_type="np").images, guarded)
    other = Guard(policy=dict(STRONG, name="other"))
    with pytest.raises(GuardError, match="wrapped by another Guard"):
        other(wrapped, prompt="a beach", num_inference_steps=2, output_type="np")
    other.close()
