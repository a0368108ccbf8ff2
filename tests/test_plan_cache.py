"""Plans follow the text encoders' effective weights and the cache is bounded; a scale that
no dtype can carry is refused, and a report never counts a step whose inhibitor was zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from gie_guard import ConceptError, Guard, GuardMetrics, PolicyError, load_policy
from gie_guard.engine import ConceptSpec
from gie_guard.limits import MIN_SCALE
from gie_guard.engine import family_for
from gie_guard.plan_cache import PlanCache, encoder_fingerprint

STRONG = {"name": "strong", "concepts": [{"id": "beach", "text": "beach", "scale": 5.0}]}


def plan(guard, pipe, **call):
    return guard.plan_for(pipe, **call)


def test_peft_scales_and_replaced_weights_invalidate_the_plan():
    from peft.tuners.lora import LoraLayer

    from gie_guard.testing import tiny_sd_pipeline
    from gie_guard.testing.variants import with_lora

    pipe = with_lora(tiny_sd_pipeline())
    guard = Guard(policy=STRONG, exclusive=False)
    first = plan(guard, pipe)
    assert plan(guard, pipe) is first  # nothing changed: cached
    layers = [m for m in pipe.text_encoder.modules() if isinstance(m, LoraLayer)]
    assert layers
    for layer in layers:  # what set_adapters(adapter_weights=...) does
        layer.set_scale("default", 0.25)
    second = plan(guard, pipe)
    assert second is not first and not torch.equal(second.embeddings, first.embeddings)
    weight = next(p for name, p in pipe.text_encoder.named_parameters() if name.endswith("mlp.fc1.weight"))
    weight.data = weight.data * 1.5  # replaced storage, no in-place version bump
    third = plan(guard, pipe)
    assert third is not second and not torch.equal(third.embeddings, second.embeddings)
    state = {k: v * 0.5 for k, v in pipe.text_encoder.state_dict().items()}
    pipe.text_encoder.load_state_dict(state)
    assert plan(guard, pipe) is not third
    fingerprint = encoder_fingerprint(pipe, {}, family_for(pipe))
    assert fingerprint == encoder_fingerprint(pipe, {}, family_for(pipe))  # stable while nothing changes
    guard.close()


def test_the_cache_is_bounded_by_count_and_bytes_and_exported():
    from gie_guard.testing import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    registry = CollectorRegistry()
    guard = Guard(policy=STRONG, exclusive=False, max_plans=3, metrics=GuardMetrics(registry), name="bounded")
    plans = [plan(guard, pipe, max_sequence_length=n) for n in (8, 9, 10, 11, 12)]
    assert len({id(p) for p in plans}) == 5
    assert guard._plans.plans == 3 and guard._plans.evictions == 2
    assert plan(guard, pipe, max_sequence_length=12) is plans[-1]  # recent ones stay
    assert plan(guard, pipe, max_sequence_length=8) is not plans[0]  # the oldest went
    text = generate_latest(registry).decode()
    assert 'gie_guard_plan_cache_plans{guard="bounded"} 3.0' in text
    held = guard._plans.bytes
    assert held > 0 and f'gie_guard_plan_cache_bytes{{guard="bounded"}} {float(held)}' in text
    small = Guard(policy=STRONG, exclusive=False, max_plan_bytes=held // 3 + 1)
    for n in (8, 9, 10):
        plan(small, pipe, max_sequence_length=n)
    assert small._plans.bytes <= held // 3 + 1 or small._plans.plans == 1
    guard.close()
    small.close()


def test_plan_cache_bounds_must_be_positive():
    with pytest.raises(ValueError):
        PlanCache(max_plans=0)
    with pytest.raises(Exception, match="max_plans"):
        Guard(policy=STRONG, max_plans=0)


@pytest.mark.parametrize("scale", [1e-46, 1e-300, 5e-324, MIN_SCALE / 2])
def test_scales_no_dtype_can_carry_are_refused(scale):
    with pytest.raises(PolicyError, match="at least 0.001"):
        load_policy({"name": "tiny", "concepts": [{"id": "x", "text": "beach", "scale": scale}]})
    with pytest.raises(ConceptError, match="scale must be 0 or"):
        ConceptSpec("x", "beach", scale)
    assert load_policy({"name": "ok", "concepts": [{"id": "x", "text": "beach", "scale": MIN_SCALE}]}).concepts


def test_a_step_counts_as_inhibited_only_where_the_subtracted_inhibitor_was_non_zero(sd_pipe):
    """Per-image scales of zero (what a presence gate answers for an absent concept) subtract
    nothing: the call is guarded, its output is unguarded, and its report lists no step."""
    from gie_guard.engine import compile_plan, guarded_call
    from gie_guard.window import StepWindow

    class Zero:
        probe = False

        def scales(self, step, measured):
            return torch.zeros_like(p.token_scales)

    p = compile_plan(sd_pipe, [ConceptSpec("beach", "beach", 5.0)], StepWindow(0.0, 1.0))
    args = dict(prompt="a beach", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    unguarded = sd_pipe(**args).images
    with guarded_call(sd_pipe, p, scale_source=Zero()) as record:
        images = sd_pipe(**dict(args, generator=torch.Generator().manual_seed(0))).images
    assert np.array_equal(images, unguarded)
    assert record.steps_inhibited == [] and record.guarded_calls == 3
    with guarded_call(sd_pipe, p) as record:
        sd_pipe(**dict(args, generator=torch.Generator().manual_seed(0)))
    assert record.steps_inhibited == [0, 1, 2]
