"""The engine against a literal implementation of GIE eq. 6-8 on real diffusers layers
(UNet cross-attention; the transformer families are in test_dit_families.py)."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

from gie_guard.engine import ConceptSpec, StepWindow, compile_plan
from gie_guard.testing.reference import engine_layer, literal_cross_attention


def _site(pipe, index=0):
    plan = compile_plan(pipe, [], StepWindow(), concept_map="gie")
    name = plan.site_names[index]
    return name, pipe.unet.get_submodule(name)


def _prompt_embeds(pipe, prompts):
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * len(prompts))
    return torch.cat([uncond, cond]), pipe.tokenizer(prompts, padding="max_length", truncation=True).input_ids


def _literal(attn, hidden, text, plan, prompt_ids, end_id, cond_rows):
    concepts = [
        (plan.embeddings[c], plan.token_positions[c], plan.token_scales[c, list(plan.token_positions[c])])
        for c in range(len(plan.concepts))
    ]
    insert_at = {r: prompt_ids[r - cond_rows[0]].index(end_id) for r in cond_rows}
    return literal_cross_attention(attn, hidden, text, concepts, cond_rows, insert_at)


@pytest.mark.parametrize(
    "concepts",
    [
        [ConceptSpec("nudity", "nude", 3.0)],
        [ConceptSpec("nudity", "nude", 3.0), ConceptSpec("style", "Vincent van Gogh", 1.5), ConceptSpec("car", "car", 7.0)],
    ],
    ids=["one-concept", "three-concepts"],
)
@pytest.mark.parametrize("long_prompt", [False, True], ids=["short-prompt", "prompt-fills-every-slot"])
def test_engine_matches_literal_equation_8(sd_pipe, concepts, long_prompt):
    end_id = sd_pipe.tokenizer.sep_token_id
    prompt = "a painting of a person on a beach at sunset"
    if long_prompt:
        prompt = " ".join(["a very detailed painting of a person walking on a beach at sunset"] * 10)
    text, ids = _prompt_embeds(sd_pipe, [prompt, "a red car"])
    if long_prompt:
        assert ids[0][-1] == end_id and sd_pipe.tokenizer.pad_token_id not in ids[0]
    plan = compile_plan(sd_pipe, concepts, StepWindow(0.0, 1.0), concept_map="gie")
    for index in (0, 7, 15):  # down, mid, up
        name, attn = _site(sd_pipe, index)
        torch.manual_seed(index)
        hidden = torch.randn(4, 16, attn.to_q.in_features)
        with torch.no_grad(), engine_layer(sd_pipe, plan, rows=[2, 3]):
            got = attn(hidden, encoder_hidden_states=text)
        want = _literal(attn, hidden, text, plan, ids, end_id, cond_rows=[2, 3])
        rel = (got - want).norm() / want.norm()
        assert rel < 1e-5, f"{name}: relative difference {rel:.2e}"
        with torch.no_grad():
            plain = attn(hidden, encoder_hidden_states=text)
        assert (got[2:] - plain[2:]).abs().max() > 1e-3  # the inhibitor really changed the prompt rows


def _plain_and_guarded(pipe, text, concept, site, rows):
    """One cross-attention layer's output on random queries, as it is and with the engine
    inhibiting ``concept`` (scale 5) in ``rows``."""
    plan = compile_plan(pipe, [ConceptSpec("c", concept, 5.0)], StepWindow(0.0, 1.0), concept_map="gie")
    _, attn = _site(pipe, site)
    hidden = torch.randn(text.shape[0], 16, attn.to_q.in_features)
    with torch.no_grad():
        plain = attn(hidden, encoder_hidden_states=text)
        with engine_layer(pipe, plan, rows=rows):
            got = attn(hidden, encoder_hidden_states=text)
    return plain, got


def test_unconditional_rows_untouched(sd_pipe):
    text, _ = _prompt_embeds(sd_pipe, ["a photo of a beach", "a cat"])
    plain, got = _plain_and_guarded(sd_pipe, text, "cat", 3, rows=[2, 3])
    assert torch.equal(got[:2], plain[:2])
    assert (got[2:] - plain[2:]).abs().max() > 1e-3


def test_rows_need_not_be_contiguous(sd_pipe):
    """PAG and other layouts put prompt rows anywhere: rows 0 and 2 of 3."""
    text, _ = _prompt_embeds(sd_pipe, ["a photo of a beach"])
    text = torch.cat([text[1:], text[:1], text[1:]])  # [prompt; negative; prompt]
    plain, got = _plain_and_guarded(sd_pipe, text, "beach", 4, rows=[0, 2])
    assert torch.equal(got[1], plain[1])
    assert (got[0] - plain[0]).abs().max() > 1e-3 and (got[2] - plain[2]).abs().max() > 1e-3


def test_outside_the_window_the_layer_is_bit_identical(sd_pipe):
    text, _ = _prompt_embeds(sd_pipe, ["a photo of a beach"])
    plan = compile_plan(sd_pipe, [ConceptSpec("c", "beach", 5.0)], StepWindow(0.0, 0.5), concept_map="gie")
    _, attn = _site(sd_pipe, 5)
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    originals = dict(sd_pipe.unet.attn_processors)
    try:
        for processor in (AttnProcessor2_0(), AttnProcessor()):
            attn.set_processor(processor)
            with torch.no_grad():
                plain = attn(hidden, encoder_hidden_states=text)
                with engine_layer(sd_pipe, plan, rows=[1], active=False):
                    got = attn(hidden, encoder_hidden_states=text)  # measured, not inhibited
            assert torch.equal(got, plain)
    finally:
        sd_pipe.unet.set_attn_processor(originals)


def test_zero_scale_is_the_identity(sd_pipe):
    text, _ = _prompt_embeds(sd_pipe, ["a photo of a beach"])
    plan = compile_plan(sd_pipe, [ConceptSpec("c", "beach", 5.0)], StepWindow(0.0, 1.0), concept_map="gie")
    _, attn = _site(sd_pipe, 9)
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    with torch.no_grad():
        plain = attn(hidden, encoder_hidden_states=text)
        with engine_layer(sd_pipe, plan, rows=[1], scales=torch.zeros_like(plan.token_scales)):
            got = attn(hidden, encoder_hidden_states=text)
    torch.testing.assert_close(got, plain, rtol=0, atol=1e-6)
    # and a plan whose only concept has scale 0 installs nothing at all
    assert compile_plan(sd_pipe, [ConceptSpec("c", "beach", 0.0)], StepWindow()).is_empty


def test_attention_slicing_gives_the_same_result(sd_pipe):
    text, _ = _prompt_embeds(sd_pipe, ["a photo of a beach", "a cat on a sofa"])
    concepts = [ConceptSpec("a", "beach", 4.0), ConceptSpec("b", "cat", 2.0), ConceptSpec("c", "sofa", 1.0)]
    plan = compile_plan(sd_pipe, concepts, StepWindow(0.0, 1.0), concept_map="gie")
    _, attn = _site(sd_pipe, 2)
    hidden = torch.randn(4, 16, attn.to_q.in_features)
    originals = dict(sd_pipe.unet.attn_processors)
    results = []
    try:
        for processor in (AttnProcessor2_0(), SlicedAttnProcessor(slice_size=1)):
            attn.set_processor(processor)
            with torch.no_grad(), engine_layer(sd_pipe, plan, rows=[2, 3]):
                results.append(attn(hidden, encoder_hidden_states=text))
    finally:
        sd_pipe.unet.set_attn_processor(originals)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_prompt_sink_matches_its_literal_definition(sd_pipe):
    """The alternative sink (the concept's own tokens inserted into the prompt's softmax)."""
    end_id = sd_pipe.tokenizer.sep_token_id
    text, ids = _prompt_embeds(sd_pipe, ["a painting of a person on a beach at sunset"])
    concepts = [ConceptSpec("a", "beach", 4.0), ConceptSpec("b", "sunset", 2.0)]
    plan = compile_plan(sd_pipe, concepts, StepWindow(0.0, 1.0), sink="prompt", concept_map="gie")
    _, attn = _site(sd_pipe, 6)
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    with torch.no_grad(), engine_layer(sd_pipe, plan, rows=[1]):
        got = attn(hidden, encoder_hidden_states=text)
    enc = [(plan.embeddings[c], plan.token_positions[c], plan.token_scales[c, list(plan.token_positions[c])]) for c in range(2)]
    want = literal_cross_attention(attn, hidden, text, enc, [1], {1: ids[0].index(end_id)}, sink="prompt")
    assert ((got - want).norm() / want.norm()) < 1e-5
