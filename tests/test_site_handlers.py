"""Site handlers: the coordinator guards whatever kinds of site a family supplies handlers
for, believes only what the sites report, and joint blocks run the attention backend the
user chose (diffusers' dispatcher) inside the window."""

from __future__ import annotations

import contextlib

import pytest
import torch

from gie_guard import Guard, GuardedCallError
from gie_guard.engine import ConceptSpec, StepWindow, compile_plan, guarded_call
from gie_guard.engine.cross import CrossHandler
from gie_guard.engine.families.unet import StableDiffusion
from gie_guard.engine.sites import Site
from gie_guard.testing import dit
from gie_guard.testing.reference import ZeroScales

STRONG = {"name": "strong", "inhibit_steps": [0.0, 1.0], "concepts": [{"id": "nude", "text": "nude", "scale": 6.0}]}
PROMPT = "a photo of a nude person on a beach"


@contextlib.contextmanager
def counting_backend(name: str):
    """Count the calls diffusers' dispatcher makes to attention backend ``name`` (the real
    backend function still runs)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    key = AttentionBackendName(name)
    real = _AttentionBackendRegistry._backends[key]
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["query"].shape if "query" in kwargs else args[0].shape)
        return real(*args, **kwargs)

    _AttentionBackendRegistry._backends[key] = counted
    try:
        yield calls
    finally:
        _AttentionBackendRegistry._backends[key] = real


def _flux_call(pipe, guard=None, **extra):
    call = dict(prompt=PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                height=32, width=32, max_sequence_length=48, **extra)
    return guard(pipe, **call) if guard is not None else pipe(**call)


def test_guarded_flux_runs_the_attention_backend_the_user_set():
    pipe = dit.tiny_flux_pipeline()
    pipe.transformer.set_attention_backend("_native_math")
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    with counting_backend("_native_math") as unguarded:
        plain = _flux_call(pipe).images
    with counting_backend("_native_math") as guarded:
        out = _flux_call(pipe, Guard(policy=STRONG, exclusive=False))
    assert len(unguarded) == 2 * blocks  # one attention per block and step
    assert len(guarded) == len(unguarded)  # the prompt's attention of every block, inhibited steps included
    assert out.guard_report.steps_inhibited == (0, 1)
    assert not torch.equal(torch.from_numpy(out.images), torch.from_numpy(plain))


def test_a_riding_concept_at_scale_zero_through_the_users_backend_changes_nothing():
    pipe = dit.tiny_flux_pipeline()
    pipe.transformer.set_attention_backend("_native_math")
    plan = compile_plan(pipe, [ConceptSpec("nude", "nude", 5.0)], StepWindow(0.0, 1.0), options={"max_sequence_length": 48})
    plain = _flux_call(pipe).images
    with counting_backend("_native_math") as calls, \
            guarded_call(pipe, plan, scale_source=ZeroScales(plan)) as record:
        got = _flux_call(pipe).images
    assert calls and record.guarded_calls == 2
    assert float(abs(got - plain).max()) <= 1e-6 * max(1.0, float(abs(plain).max()))


class CountedCross(CrossHandler):
    """A handler of a kind the engine has never heard of: cross-attention, counted."""

    installs = 0

    def install(self, site, shared, report):
        CountedCross.installs += 1
        return super().install(site, shared, report)


class Silent(CrossHandler):
    """Installs like the cross handler but never reports: the coordinator must not believe
    a site applied what it did not report."""

    def install(self, site, shared, report):
        return super().install(site, shared, lambda outcome: None)


class Relabelled(StableDiffusion):
    handler: CrossHandler = CountedCross()

    def sites(self, pipe):
        return tuple(Site(s.name, s.module, "counted-cross", s.block) for s in super().sites(pipe))

    def site_handlers(self):
        return {"counted-cross": self.handler}


def test_a_family_brings_a_new_site_kind_without_engine_changes(sd_pipe):
    family = Relabelled(type(sd_pipe).__name__)
    plan = compile_plan(sd_pipe, [ConceptSpec("beach", "beach", 4.0)], StepWindow(0.0, 1.0), family=family)
    generator = torch.Generator().manual_seed(0)
    plain = sd_pipe("a photo of a beach", num_inference_steps=2, generator=generator, output_type="np").images
    before = CountedCross.installs
    with guarded_call(sd_pipe, plan) as record:
        got = sd_pipe("a photo of a beach", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    assert CountedCross.installs - before == len(plan.site_names)
    assert record.steps_inhibited == [0, 1] and not (got == plain).all()


def test_a_site_that_reports_nothing_fails_the_call(sd_pipe):
    family = Relabelled(type(sd_pipe).__name__)
    family.handler = Silent()
    plan = compile_plan(sd_pipe, [ConceptSpec("beach", "beach", 4.0)], StepWindow(0.0, 1.0), family=family)
    with pytest.raises(GuardedCallError, match="did not run"), guarded_call(sd_pipe, plan):
        sd_pipe("a photo of a beach", num_inference_steps=2, output_type="np")


def test_a_kind_without_a_handler_is_refused_before_any_step(sd_pipe):
    from gie_guard import UnsupportedPipelineError

    class NoHandler(Relabelled):
        def site_handlers(self):
            return {}

    plan = compile_plan(sd_pipe, [ConceptSpec("beach", "beach", 4.0)], StepWindow(0.0, 1.0),
                        family=NoHandler(type(sd_pipe).__name__))
    steps = []
    with pytest.raises(UnsupportedPipelineError, match="no handler for 'counted-cross'"), guarded_call(sd_pipe, plan):
        sd_pipe("a photo of a beach", num_inference_steps=2, output_type="np",
                callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert steps == []
