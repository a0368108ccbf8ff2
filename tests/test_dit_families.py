"""Transformer backbones (SD3/SD3.5, Flux, PixArt-Sigma, Sana) on tiny random-weight pipelines:
the invariants every family keeps, and the engine against literal references per family."""

import numpy as np
import pytest
import torch

from gie_guard import Guard, UnsupportedPipelineError
from gie_guard.engine import ConceptSpec, StepWindow, compile_plan, family_for
from gie_guard.testing import dit
from gie_guard.testing.reference import (
    engine_joint_block,
    engine_layer,
    flux_rotary,
    joint_inputs,
    literal_cross_attention,
    literal_joint_attention,
)

# per family: builder and the call settings that keep it small and fast
FAMILIES = {
    "sd3": (dit.tiny_sd3_pipeline, dict(height=32, width=32)),
    "flux": (dit.tiny_flux_pipeline, dict(height=32, width=32, max_sequence_length=48)),
    "pixart": (dit.tiny_pixart_pipeline, dict(height=32, width=32, use_resolution_binning=False, max_sequence_length=48)),
    "sana": (dit.tiny_sana_pipeline, dict(height=32, width=32, use_resolution_binning=False, max_sequence_length=48)),
}
STRONG = {"name": "strong", "inhibit_steps": [0.0, 1.0], "concepts": [{"id": "nude", "text": "nude", "scale": 6.0}]}
PROMPT = "a photo of a nude person on a beach"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_pipe(request):
    build, settings = FAMILIES[request.param]
    return request.param, build(), settings


def run(pipe, settings, guard=None, *, seed=0, steps=2, **extra):
    call = dict(prompt=PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="np", **settings, **extra)
    return guard(pipe, **call) if guard is not None else pipe(**call)


def _hooks(module):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def test_empty_policy_and_zero_scale_are_bit_identical(family_pipe):
    name, pipe, settings = family_pipe
    plain = run(pipe, settings).images
    for policy in ({"name": "empty", "concepts": []},
                   {"name": "zero", "concepts": [{"id": "nude", "text": "nude", "scale": 0.0}]}):
        assert np.array_equal(run(pipe, settings, Guard(policy=policy)).images, plain), (name, policy["name"])


def test_guarded_call_reports_family_rows_and_steps_and_restores_everything(family_pipe):
    name, pipe, settings = family_pipe
    model = family_for(pipe).denoiser(pipe)
    before = {k: p for k, p in model.attn_processors.items()}
    plain = run(pipe, settings).images
    out = run(pipe, settings, Guard(policy=STRONG))
    report = out.guard_report
    assert np.abs(out.images - plain).max() > 1e-4, name
    assert report.family == name and report.steps_inhibited == (0, 1) and report.total_steps == 2
    batch, rows = report.rows_guarded[0]
    # CFG families stack [negative; prompt]: the second half carries the prompt; Flux has one row
    assert rows == ((0,) if name == "flux" else (1,)) and batch == (1 if name == "flux" else 2)
    assert all(model.attn_processors[k] is p for k, p in before.items())
    assert _hooks(model) == 0 and "encode_prompt" not in vars(pipe) and "step" not in vars(pipe.scheduler)
    assert np.array_equal(run(pipe, settings).images, plain)  # nothing left behind


def test_processors_and_hooks_restored_when_the_call_raises(family_pipe):
    name, pipe, settings = family_pipe
    model = family_for(pipe).denoiser(pipe)
    before = dict(model.attn_processors)

    def explode(*args, **kwargs):
        raise RuntimeError("boom in the middle of denoising")

    extra = {"callback": explode} if name == "pixart" else {"callback_on_step_end": explode}
    with pytest.raises(RuntimeError, match="boom"):
        run(pipe, settings, Guard(policy=STRONG), **extra)
    assert all(model.attn_processors[k] is p for k, p in before.items())
    assert _hooks(model) == 0 and "encode_prompt" not in vars(pipe)


def test_steps_outside_the_window_are_untouched(family_pipe):
    name, pipe, settings = family_pipe
    seen = {}

    def record(tag):
        def on_step(*args):
            latents = args[2] if name == "pixart" else args[3]["latents"]
            seen.setdefault(tag, []).append((latents if name == "pixart" else latents).clone())
            return None if name == "pixart" else args[3]

        return {"callback": on_step} if name == "pixart" else {"callback_on_step_end": on_step}

    late = dict(STRONG, inhibit_steps=[0.5, 1.0])
    run(pipe, settings, **record("plain"))
    out = run(pipe, settings, Guard(policy=late), **record("guarded"))
    assert out.guard_report.steps_inhibited == (1,)
    assert torch.equal(seen["plain"][0], seen["guarded"][0])
    assert not torch.equal(seen["plain"][1], seen["guarded"][1])


def test_a_window_narrower_than_one_step_is_widened_not_skipped(family_pipe):
    name, pipe, settings = family_pipe
    out = run(pipe, settings, Guard(policy=dict(STRONG, inhibit_steps=[0.5, 1.0])), steps=1)
    assert out.guard_report.window_widened and out.guard_report.steps_inhibited == (0,)
    assert np.abs(out.images - run(pipe, settings, steps=1).images).max() > 1e-4


# -- literal references ------------------------------------------------------------------------------


def _concepts(n):
    texts = [("nude", "nude", 3.0), ("style", "Vincent van Gogh", 1.5), ("car", "red car", 7.0)][:n]
    return [ConceptSpec(i, t, w) for i, t, w in texts]


@pytest.fixture(scope="module")
def sd3_pipe():
    return dit.tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def flux_pipe():
    return dit.tiny_flux_pipeline()






@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("sink", ["image", "prompt"])
def test_sd3_joint_block_matches_its_literal_reference(sd3_pipe, count, sink):
    plan = compile_plan(sd3_pipe, _concepts(count), StepWindow(0.0, 1.0), sink=sink)
    for site in ("transformer_blocks.0.attn", "transformer_blocks.2.attn"):  # the last is context_pre_only
        attn = sd3_pipe.transformer.get_submodule(site)
        image, text, states, weights = joint_inputs(attn, plan)
        with torch.no_grad(), engine_layer(sd3_pipe, plan, rows=[1], text_length=text.shape[1]):
            got_image, got_text = attn(hidden_states=image, encoder_hidden_states=torch.cat([text, *states], dim=1))
        want_image, want_concepts = literal_joint_attention(attn, image, text, list(zip(states, weights)), [1], sink=sink)
        plain_image, _ = literal_joint_attention(attn, image, text, [(s, w * 0) for s, w in zip(states, weights)], [1])
        with torch.no_grad():
            want_image, plain_image = attn.to_out[0](want_image), attn.to_out[0](plain_image)
        assert ((want_image - plain_image)[1].norm() / plain_image[1].norm()) > 1e-3  # the inhibitor is not nothing
        assert torch.allclose(got_image[0], plain_image[0], atol=1e-5)  # the negative row is untouched
        rel = (got_image - want_image).norm() / want_image.norm()
        assert rel < 1e-5, f"{site}: image rows differ by {rel:.2e}"
        # the concept tokens' own stream (prompt row), before the block's text output projection
        t = text.shape[1]
        got_concepts = got_text[1:, t:]
        if not attn.context_pre_only:
            want = attn.to_add_out(torch.cat(want_concepts, dim=1)[1:])
        else:
            want = torch.cat(want_concepts, dim=1)[1:]
        assert ((got_concepts - want).norm() / want.norm()) < 1e-5, site


@pytest.mark.parametrize("count", [1, 3])
def test_flux_double_and_single_blocks_match_their_literal_reference(flux_pipe, count):
    plan = compile_plan(flux_pipe, _concepts(count), StepWindow(0.0, 1.0), options={"max_sequence_length": 48})
    for site in ("transformer_blocks.1.attn", "single_transformer_blocks.0.attn"):
        attn = flux_pipe.transformer.get_submodule(site)
        single = site.startswith("single")
        image, text, states, weights = joint_inputs(attn, plan, n=16, single=single)
        t_all = text.shape[1] + sum(s.shape[1] for s in states)
        rotary = flux_rotary(flux_pipe, t_all, image.shape[1])
        got_image, got_text = engine_joint_block(flux_pipe, plan, attn, image, text, states, [0, 1], single=single,
                                                 rotary=rotary)
        want_image, want_concepts = literal_joint_attention(
            attn, image, text, list(zip(states, weights)), [0, 1], single=single, rotary=rotary)
        plain_image, _ = literal_joint_attention(
            attn, image, text, [(s, w * 0) for s, w in zip(states, weights)], [0, 1], single=single, rotary=rotary)
        assert ((want_image - plain_image).norm() / plain_image.norm()) > 1e-3  # the inhibitor is not nothing
        with torch.no_grad():
            if not single:
                want_image = attn.to_out[0](want_image)
            want_concepts = torch.cat(want_concepts, dim=1)
            if not single:
                want_concepts = attn.to_add_out(want_concepts)
        assert ((got_image - want_image).norm() / want_image.norm()) < 1e-5, site
        got_concepts = got_text[:, text.shape[1]:]
        assert ((got_concepts - want_concepts).norm() / want_concepts.norm()) < 1e-5, site


@pytest.fixture(scope="module")
def pixart_pipe():
    return dit.tiny_pixart_pipeline()


@pytest.mark.parametrize("count", [1, 3])
def test_pixart_cross_attention_matches_its_literal_reference(pixart_pipe, count):
    pipe = pixart_pipe
    family = family_for(pipe)
    plan = compile_plan(pipe, _concepts(count), StepWindow(0.0, 1.0), options={"max_sequence_length": 48})
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        [PROMPT], do_classifier_free_guidance=True, max_sequence_length=48)
    text = family.text_for_sites(pipe.transformer, torch.cat([negative, embeds]))
    masks = torch.cat([negative_mask, mask])
    bias = ((1 - masks.float()) * -10000.0)[:, None]  # as PixArtTransformer2DModel passes it
    attn = pipe.transformer.get_submodule(plan.site_names[1])
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    with torch.no_grad(), engine_layer(pipe, plan, rows=[1]):
        got = attn(hidden, encoder_hidden_states=text, attention_mask=bias)
    site_text = family.text_for_sites(pipe.transformer, plan.embeddings)
    concepts = [(site_text[c], plan.token_positions[c], plan.token_scales[c, list(plan.token_positions[c])])
                for c in range(count)]
    end = int(mask[0].sum()) - 1  # before the prompt's end token
    want = literal_cross_attention(attn, hidden, text, concepts, [1], {1: end}, sink="prompt", text_mask=masks)
    assert ((got - want).norm() / want.norm()) < 1e-5
    plain = literal_cross_attention(attn, hidden, text, [], [1], {1: end}, text_mask=masks)
    assert ((want - plain)[1].norm() / plain[1].norm()) > 1e-3 and torch.allclose(got[0], plain[0], atol=1e-5)


# -- refusals ----------------------------------------------------------------------------------------


def test_flux_ip_adapter_and_fused_projections_are_refused():
    from gie_guard.testing.variants import with_flux_ip_adapter

    pipe = with_flux_ip_adapter(dit.tiny_flux_pipeline())
    with pytest.raises(UnsupportedPipelineError, match="FluxIPAdapterAttnProcessor"):
        run(pipe, FAMILIES["flux"][1], Guard(policy=STRONG))
    fused = dit.tiny_flux_pipeline()
    fused.transformer.fuse_qkv_projections()
    with pytest.raises(UnsupportedPipelineError, match="fused"):
        Guard(policy=STRONG).wrap(fused)


def test_transformer_pipelines_without_a_family_are_refused():
    import diffusers

    for name in ("ChromaInpaintPipeline", "QwenImagePipeline", "StableDiffusion3ControlNetPipeline"):
        cls = getattr(diffusers, name)
        with pytest.raises(UnsupportedPipelineError, match=f"cannot guard .*{name}"):
            family_for(object.__new__(cls))


def test_flux_true_cfg_leaves_the_negative_pass_alone(flux_pipe):
    settings = FAMILIES["flux"][1]
    out = run(flux_pipe, settings, Guard(policy=STRONG), negative_prompt="blurry", true_cfg_scale=2.0)
    report = out.guard_report
    assert report.denoiser_calls == 4 and report.steps_inhibited == (0, 1)  # two calls a step, one guarded
    assert report.rows_guarded == ((1, (0,)), (1, ()))


def test_sd3_skip_layer_guidance_counts_one_step_per_step(sd3_pipe):
    settings = FAMILIES["sd3"][1]
    out = run(sd3_pipe, settings, Guard(policy=STRONG), steps=4, skip_guidance_layers=[1],
              skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    report = out.guard_report
    assert report.total_steps == 4 and report.steps_inhibited == (0, 1, 2, 3)
    assert report.denoiser_calls > 4  # the skip-layer calls ran, inside the same steps
    assert (1, (0,)) in report.rows_guarded  # the skip-layer call carries only the prompt row


def test_guard_on_flux_from_the_readme():
    pipe = dit.tiny_flux_pipeline()
    image = Guard(policy="nsfw")(pipe, prompt="a photo of a person", num_inference_steps=2, height=32, width=32,
                                 max_sequence_length=48).images[0]
    assert image.size == (32, 32)


def test_interrupted_run_returns_its_partial_output_with_a_report(sd3_pipe):
    def stop(pipeline, step, timestep, callback_kwargs):
        pipeline._interrupt = True
        return callback_kwargs

    out = run(sd3_pipe, FAMILIES["sd3"][1], Guard(policy=STRONG), steps=4, callback_on_step_end=stop)
    report = out.guard_report
    assert report.interrupted and report.steps_run == 1 and report.total_steps == 4
    assert report.steps_inhibited == (0,)
