"""Production variants of the UNet pipelines, guarded end to end: ControlNet (single, multi,
SDXL), T2I-Adapter, PAG, LoRA (peft), IP-Adapter, fused QKV; what stays refused."""

import numpy as np
import pytest
import torch
from PIL import Image

from gie_guard import Guard, UnsupportedPipelineError
from gie_guard.testing import tiny_sd_pipeline, variants

STRONG = {"name": "strong", "inhibit_steps": [0.0, 1.0], "concepts": [{"id": "beach", "text": "beach", "scale": 8.0}]}
IMAGE = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype("uint8"))

CASES = {
    "controlnet": (lambda: variants.tiny_sd_controlnet_pipeline(), dict(image=IMAGE)),
    "multi-controlnet": (lambda: variants.tiny_sd_controlnet_pipeline(multi=True), dict(image=[IMAGE, IMAGE])),
    "sdxl-controlnet": (lambda: variants.tiny_sdxl_controlnet_pipeline(), dict(image=IMAGE)),
    "t2i-adapter": (lambda: variants.tiny_sd_t2i_adapter_pipeline(), dict(image=IMAGE)),
    "pag": (lambda: variants.tiny_sd_pag_pipeline(), dict(pag_scale=2.0)),
    "lora": (lambda: variants.with_lora(tiny_sd_pipeline()), {}),
    "ip-adapter": (lambda: variants.with_ip_adapter(tiny_sd_pipeline()), dict(ip_adapter_image=IMAGE)),
    "fused-qkv": (lambda: variants.with_fused_qkv(tiny_sd_pipeline()), {}),
}


def run(pipe, guard=None, **extra):
    kw = dict(prompt="a photo of a beach", num_inference_steps=2, output_type="np",
              generator=torch.Generator().manual_seed(0), **extra)
    return guard(pipe, **kw) if guard is not None else pipe(**kw)


def _hooks(module):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


@pytest.mark.parametrize("case", sorted(CASES))
def test_variant_is_guarded_end_to_end(case):
    build, extra = CASES[case]
    pipe = build()
    before = dict(pipe.unet.attn_processors)
    hooks = _hooks(pipe.unet)
    plain = run(pipe, **extra).images
    out = run(pipe, Guard(policy=STRONG), **extra)
    report = out.guard_report
    # > 1e-4: on random SDXL weights the calibrated map (the UNet default) changes little
    assert np.abs(out.images - plain).max() > 1e-4, case
    assert report.steps_inhibited == (0, 1) and report.concept_ids == ("beach",) and report.total_steps == 2
    assert report.rows_guarded and all(rows for _, rows in report.rows_guarded)
    assert all(pipe.unet.attn_processors[k] is p for k, p in before.items()), case
    assert _hooks(pipe.unet) == hooks, case
    assert np.array_equal(run(pipe, **extra).images, plain), case  # nothing left behind


def test_pag_guards_the_perturbed_rows_too():
    build, extra = CASES["pag"]
    report = run(build(), Guard(policy=STRONG), **extra).guard_report
    # [negative; prompt; prompt with perturbed self-attention]: both prompt rows carry the prompt
    assert report.rows_guarded == ((3, (1, 2)),)


def test_ip_adapter_keeps_its_image_branch():
    """The inhibitor comes off the text branch only: with a zero scale the IP-Adapter output is
    exactly the pipeline's own, image branch included."""
    pipe = variants.with_ip_adapter(tiny_sd_pipeline())
    zero = {"name": "zero", "concepts": [{"id": "beach", "text": "beach", "scale": 0.0}]}
    plain = run(pipe, ip_adapter_image=IMAGE).images
    assert np.array_equal(run(pipe, Guard(policy=zero), ip_adapter_image=IMAGE).images, plain)
    pipe.set_ip_adapter_scale(0.0)
    assert np.abs(run(pipe, ip_adapter_image=IMAGE).images - plain).max() > 1e-4  # the branch was live


def test_a_compiled_unet_is_refused():
    pipe = tiny_sd_pipeline()
    pipe.unet = torch.compile(pipe.unet)
    with pytest.raises(UnsupportedPipelineError, match="torch.compile"):
        run(pipe, Guard(policy=STRONG))


def test_plans_follow_what_changes_concept_encodings():
    """A token added to the tokenizer, a LoRA loaded into the text encoder, or a LoRA scale in
    the call after the first call: the plan is compiled again, never reused stale."""
    pipe = tiny_sd_pipeline()
    guard = Guard(policy=STRONG)
    run(pipe, guard)
    first = guard.plan_for(pipe)
    assert guard.plan_for(pipe) is first
    pipe.tokenizer.add_tokens(["<my-style>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    second = guard.plan_for(pipe)
    assert second is not first
    variants.with_lora(pipe)
    third = guard.plan_for(pipe)
    assert third is not second and not torch.equal(third.embeddings, second.embeddings)
    assert guard.plan_for(pipe, cross_attention_kwargs={"scale": 0.5}) is not third


def test_controlnet_cross_attention_is_inhibited_unless_skipped():
    pipe = variants.tiny_sd_controlnet_pipeline(multi=True)
    controlnets = list(pipe.controlnet.nets)
    torch.manual_seed(0)
    for net in controlnets:  # a trained ControlNet's zero convolutions are no longer zero
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.2)
    hooks = [_hooks(net) for net in controlnets]
    extra = dict(image=[IMAGE, IMAGE])
    inhibited = run(pipe, Guard(policy=STRONG), **extra).images
    skipped = run(pipe, Guard(policy=STRONG, controlnet="skip"), **extra).images
    by_policy = run(pipe, Guard(policy={**STRONG, "controlnet": "skip"}), **extra).images
    plain = run(pipe, **extra).images
    assert np.abs(inhibited - skipped).max() > 1e-5  # the ControlNets' residuals changed too
    assert np.array_equal(by_policy, skipped)  # the policy key and the Guard argument agree
    assert np.abs(skipped - plain).max() > 1e-3
    assert [_hooks(net) for net in controlnets] == hooks
    guess = run(pipe, Guard(policy=STRONG), guess_mode=True, **extra).guard_report
    assert (1, (0,)) in guess.rows_guarded or (2, (1,)) in guess.rows_guarded  # guess mode: prompt rows only
