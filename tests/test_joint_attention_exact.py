"""Joint-attention GIE checked where a regression would hide: the prompt's own streams (its text
queries must never see the riding concept tokens), rows that do not carry the prompt, q/k norms
with weights that are not all 1 (so a norm mix-up shows), SD3.5's blocks, and whole guarded
calls with concepts riding at scale 0 against the unguarded call."""

from __future__ import annotations

import pytest
import torch

from gie_guard.engine import ConceptSpec, StepWindow, compile_plan
from gie_guard.testing import dit
from gie_guard.testing.reference import (
    ZeroScales,
    engine_joint_block,
    flux_rotary,
    joint_inputs,
    literal_joint_attention,
    random_norms,
    relative_difference,
)

CONCEPTS = [ConceptSpec("nude", "nude", 3.0), ConceptSpec("car", "red car", 7.0)]


@pytest.fixture(scope="module")
def sd35():
    pipe = dit.tiny_sd35_pipeline()
    random_norms(pipe.transformer)
    return pipe


@pytest.fixture(scope="module")
def sd3():
    return dit.tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def flux():
    pipe = dit.tiny_flux_pipeline()
    random_norms(pipe.transformer)
    return pipe


def _check_sd3_site(pipe, site):
    plan = compile_plan(pipe, CONCEPTS, StepWindow(0.0, 1.0))
    attn = pipe.transformer.get_submodule(site)
    original = attn.processor
    image, text, states, weights = joint_inputs(attn, plan)
    with torch.no_grad():
        plain = original(attn, hidden_states=image, encoder_hidden_states=text)  # the prompt alone
    got_image, got_text = engine_joint_block(pipe, plan, attn, image, text, states, [1])
    want_image, want_concepts = literal_joint_attention(attn, image, text, list(zip(states, weights)), [1])
    with torch.no_grad():
        want_image = attn.to_out[0](want_image)
    plain_image, plain_text = plain  # the last block (context_pre_only) returns its text unprojected
    assert relative_difference(want_image[1], plain_image[1]) > 1e-3  # the inhibitor is not nothing
    assert relative_difference(got_image, want_image) < 1e-5, f"{site}: image rows against the literal reference"
    assert relative_difference(got_image[0], plain_image[0]) < 1e-6, f"{site}: the negative row is the block's own output"
    t = text.shape[1]
    # the prompt's text stream, every row: its queries never see the concept tokens
    assert relative_difference(got_text[:, :t], plain_text) < 1e-6, f"{site}: the prompt's text stream changed"
    want_c = torch.cat(want_concepts, dim=1)[1:]
    if not attn.context_pre_only:
        want_c = attn.to_add_out(want_c)
    assert relative_difference(got_text[1:, t:], want_c) < 1e-5, f"{site}: the concept tokens' stream"


@pytest.mark.parametrize("site", ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "transformer_blocks.2.attn"])
def test_sd35_blocks_with_random_qk_norms_match_the_literal_reference(sd35, site):
    assert sd35.transformer.get_submodule(site).norm_q is not None  # SD3.5 normalises q and k
    _check_sd3_site(sd35, site)


@pytest.mark.parametrize("site", ["transformer_blocks.0.attn", "transformer_blocks.2.attn"])
def test_sd3_prompt_streams_are_the_blocks_own(sd3, site):
    _check_sd3_site(sd3, site)


@pytest.mark.parametrize("site", ["transformer_blocks.1.attn", "single_transformer_blocks.0.attn"])
def test_flux_with_random_norms_matches_the_literal_reference_and_keeps_the_prompt_streams(flux, site):
    plan = compile_plan(flux, CONCEPTS, StepWindow(0.0, 1.0), options={"max_sequence_length": 48})
    attn = flux.transformer.get_submodule(site)
    single = site.startswith("single")
    original = attn.processor
    image, text, states, weights = joint_inputs(attn, plan, n=16, single=single)
    t, n = text.shape[1], image.shape[1]
    t_all = t + sum(s.shape[1] for s in states)
    rotary = flux_rotary(flux, t_all, n)
    alone = flux_rotary(flux, t, n)  # text ids are all zero, so the prompt's positions are the same
    with torch.no_grad():
        if single:
            plain = original(attn, hidden_states=torch.cat([text, image], dim=1), image_rotary_emb=alone)
            plain_image, plain_text = plain[:, t:], plain[:, :t]
        else:
            plain_image, plain_text = original(attn, hidden_states=image, encoder_hidden_states=text,
                                               image_rotary_emb=alone)
    got_image, got_text = engine_joint_block(flux, plan, attn, image, text, states, [1], single=single, rotary=rotary)
    want_image, want_concepts = literal_joint_attention(attn, image, text, list(zip(states, weights)), [1],
                                                        single=single, rotary=rotary)
    with torch.no_grad():
        want_concepts = torch.cat(want_concepts, dim=1)
        if not single:
            want_image, want_concepts = attn.to_out[0](want_image), attn.to_add_out(want_concepts)
    assert relative_difference(want_image[1], plain_image[1]) > 1e-3
    assert relative_difference(got_image, want_image) < 1e-5, f"{site}: image rows against the literal reference"
    assert relative_difference(got_image[0], plain_image[0]) < 1e-6, f"{site}: the negative row is the block's own output"
    assert relative_difference(got_text[:, :t], plain_text) < 1e-6, f"{site}: the prompt's text stream changed"
    assert relative_difference(got_text[1:, t:], want_concepts[1:]) < 1e-5, f"{site}: the concept tokens' stream"


@pytest.fixture(scope="module")
def chroma():
    pipe = dit.tiny_chroma_pipeline()
    random_norms(pipe.transformer)
    return pipe


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux", "chroma"])
def test_concepts_riding_at_scale_zero_leave_the_call_as_unguarded(family, request):
    """The whole denoiser with the concept tokens carried through every block and nothing
    subtracted: equal to the unguarded call within float rounding (relative 1e-6). A leak of
    the concept tokens into the prompt's attention would change the prompt's text stream, and
    with it every later block."""
    from gie_guard.engine import guarded_call

    pipe = request.getfixturevalue(family)  # Chroma: its mask extended over the carried tokens
    extra = {"max_sequence_length": 48} if family in ("flux", "chroma") else {}
    args = dict(prompt="a photo of a nude person beside a red car", num_inference_steps=2, height=32, width=32,
                output_type="latent", **extra)
    plan = compile_plan(pipe, CONCEPTS, StepWindow(0.0, 1.0), options=extra or None)
    unguarded = pipe(generator=torch.Generator().manual_seed(0), **args).images
    with guarded_call(pipe, plan, scale_source=ZeroScales(plan)) as record:
        riding = pipe(generator=torch.Generator().manual_seed(0), **args).images
    assert record.guarded_calls == 2 and record.steps_inhibited == []  # rode along, subtracted nothing
    assert relative_difference(riding, unguarded) <= 1e-6
    with guarded_call(pipe, plan) as record:
        inhibited = pipe(generator=torch.Generator().manual_seed(0), **args).images
    assert record.steps_inhibited == [0, 1] and relative_difference(inhibited, unguarded) > 1e-3
