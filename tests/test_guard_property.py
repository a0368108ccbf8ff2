"""A stateful property test of failing closed: random sequences of what users do to a guarded
pipeline (move it, from_pipe, rebuild from components, copy, wrap, release, attach, change
processors, load and scale a LoRA, fuse QKV, compile, reload the policy with good, cut-short
and emptying files), each followed by a call. Every call that should be guarded either raises
a GuardError or returns output that differs from the unguarded output of the same pipeline
state for a strong concept, with a report that is true (the live policy, the steps that were
inhibited). The unguarded reference comes from a guard with an empty policy: that is a
guarded call too, so it may run an owned denoiser, and its output is bit-identical to the raw one."""

from __future__ import annotations

import copy

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gie_guard import Guard, GuardedPipeline, GuardError
from gie_guard.engine import ownership

POLICIES = {
    "beach": "name: live\nconcepts:\n  - {id: beach, text: beach, scale: 6.0}\n",
    "sky": "name: live\nconcepts:\n  - {id: beach, text: beach, scale: 6.0}\n  - {id: sky, text: sky, scale: 6.0}\n",
}
BROKEN = {"cut": "name: live\n", "empty": "name: live\nconcepts: []\n"}


def raw(pipe):
    return pipe.pipeline if type(pipe) is GuardedPipeline else pipe


class Strange:
    """An attention processor gie_guard has never seen."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        from diffusers.models.attention_processor import AttnProcessor

        return AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask)


class GuardedPipelineMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.folder = None

    @initialize()
    def start(self):
        import tempfile
        from pathlib import Path

        from gie_guard.testing import tiny_sd_pipeline

        ownership._release_everything()
        self.folder = Path(tempfile.mkdtemp(prefix="gie-guard-stateful-"))
        self.policy = self.folder / "live.yaml"
        self.policy.write_text(POLICIES["beach"])
        self.guard = Guard(policy=str(self.policy))
        self.reference = Guard(policy={"name": "none", "concepts": []}, exclusive=False)
        self.pipe = self.guard.wrap(tiny_sd_pipeline())
        self.compiled = False
        self.lora = False

    def teardown(self):
        if self.folder is not None:
            self.guard.close()
            self.reference.close()
            ownership._release_everything()

    @property
    def should_guard(self):
        return type(self.pipe) is GuardedPipeline or ownership.is_owned(raw(self.pipe).unet)

    # -- what users do ------------------------------------------------------------------------
    @rule()
    def to_cpu(self):
        self.pipe = self.pipe.to("cpu")

    @rule(via_wrapper=st.booleans())
    def from_pipe(self, via_wrapper):
        from diffusers import StableDiffusionPipeline

        if via_wrapper and type(self.pipe) is GuardedPipeline:
            self.pipe = self.pipe.from_pipe()
        else:
            self.pipe = StableDiffusionPipeline.from_pipe(self.pipe)

    @rule()
    def from_components(self):
        from diffusers import StableDiffusionPipeline

        self.pipe = StableDiffusionPipeline(**raw(self.pipe).components)

    @rule(deep=st.booleans())
    def copied(self, deep):
        self.pipe = copy.deepcopy(self.pipe) if deep else copy.copy(self.pipe)

    @rule()
    def wrap(self):
        self.pipe = self.guard.wrap(self.pipe)

    @rule()
    def release(self):
        self.guard.release(self.pipe)

    @rule(kind=st.sampled_from(["default", "strange"]))
    def processors(self, kind):
        unet = raw(self.pipe).unet
        if kind == "default":
            unet.set_default_attn_processor()
        else:
            unet.set_attn_processor(Strange())

    @precondition(lambda self: not self.lora)
    @rule()
    def load_lora(self):
        from gie_guard.testing.variants import with_lora

        with_lora(raw(self.pipe))
        self.lora = True

    @precondition(lambda self: self.lora)
    @rule(scale=st.sampled_from([0.0, 0.5, 2.0]))
    def lora_scale(self, scale):
        from peft.tuners.lora import LoraLayer

        for module in raw(self.pipe).text_encoder.modules():
            if isinstance(module, LoraLayer):
                module.set_scale("default", scale)

    @rule()
    def fuse(self):
        raw(self.pipe).fuse_qkv_projections()

    @rule()
    def compile(self):
        raw(self.pipe).unet.compile()
        self.compiled = True

    @rule(content=st.sampled_from(sorted(POLICIES) + sorted(BROKEN)))
    def reload(self, content):
        before = self.guard.snapshot
        self.policy.write_text({**POLICIES, **BROKEN}[content])
        ok = self.guard.reload()
        if content in BROKEN:
            assert not ok and self.guard.snapshot is before  # cut short or emptying: refused
        else:
            assert ok

    # -- the call -----------------------------------------------------------------------------
    @invariant()
    def every_call_is_guarded_or_refused(self):
        if self.folder is None:
            return
        if self.compiled and not self.should_guard:
            return  # an unguarded, compiled pipeline would only measure torch.compile
        args = dict(prompt="a beach under the sky", num_inference_steps=2, output_type="np")
        if self.should_guard:
            try:
                out = self.pipe(generator=torch.Generator().manual_seed(0), **args)
            except GuardError:
                return
            report = out.guard_report
            live = self.guard.snapshot
            assert report.policy_hash == live.content_hash
            assert report.concept_ids == tuple(c.id for c in live.concepts)
            assert report.steps_inhibited == (0, 1)
            reference = self.reference(raw(self.pipe), generator=torch.Generator().manual_seed(0), **args).images
            assert np.abs(out.images - reference).max() > 1e-4


GuardedPipelineMachine.TestCase.settings = settings(
    max_examples=12, stateful_step_count=6, deadline=None, derandomize=True,
    suppress_health_check=list(HealthCheck),
)
test_guarded_pipelines_fail_closed = GuardedPipelineMachine.TestCase
