"""The engine against a literal implementation of GIE eq. 6-8 on real diffusers layers."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from gie_guard.engine import CallState, ConceptSpec, GrowthInhibitorProcessor, StepWindow, compile_plan


def _layer(pipe, index=0):
    name = compile_plan(pipe, [], StepWindow()).layer_names[index]
    return name, pipe.unet.get_submodule(name.removesuffix(".processor"))


def _prompt_embeds(pipe, prompts):
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * len(prompts))
    return torch.cat([uncond, cond]), pipe.tokenizer(prompts, padding="max_length", truncation=True).input_ids


def _state(plan, *, active=True, cfg=True):
    state = CallState(plan.embeddings, plan.token_scales, plan.window.start, plan.window.end)
    state.active = active
    state.classifier_free_guidance = cfg
    return state


def _literal_eq8(attn, hidden, text, prompt_ids, end_id, plan, cond_rows):
    """O' = [M_p | -w M_c[J]] @ [V_p ; V_c[J]] with the concept columns inserted just
    before the prompt's end token, computed row by row with explicit softmaxes."""
    heads = attn.heads
    out_rows = []
    for b in range(hidden.shape[0]):
        q = attn.to_q(hidden[b])  # (N, heads*d)
        d = q.shape[-1] // heads
        q = q.view(-1, heads, d).transpose(0, 1)  # (heads, N, d)
        kp = attn.to_k(text[b]).view(-1, heads, d).transpose(0, 1)
        vp = attn.to_v(text[b]).view(-1, heads, d).transpose(0, 1)
        maps = torch.softmax(q @ kp.transpose(-1, -2) / d**0.5, dim=-1)  # (heads, N, T)
        values = vp
        if b in cond_rows:
            end = prompt_ids[b - cond_rows[0]].index(end_id)
            for c, positions in enumerate(plan.token_positions):
                emb = plan.embeddings[c]
                kc = attn.to_k(emb).view(-1, heads, d).transpose(0, 1)
                vc = attn.to_v(emb).view(-1, heads, d).transpose(0, 1)
                mc = torch.softmax(q @ kc.transpose(-1, -2) / d**0.5, dim=-1)  # its own softmax
                j = list(positions)
                w = plan.token_scales[c, j]
                maps = torch.cat([maps[..., :end], -w * mc[..., j], maps[..., end:]], dim=-1)
                values = torch.cat([values[:, :end], vc[:, j], values[:, end:]], dim=1)
        o = (maps @ values).transpose(0, 1).reshape(-1, heads * d)
        out_rows.append(attn.to_out[0](o))
    return torch.stack(out_rows)



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
    plan = compile_plan(sd_pipe, concepts, StepWindow(0.0, 1.0))
    for index in (0, 7, 15):  # down, mid, up
        name, attn = _layer(sd_pipe, index)
        torch.manual_seed(index)
        hidden = torch.randn(4, 16, attn.to_q.in_features)
        with torch.no_grad():
            got = GrowthInhibitorProcessor(AttnProcessor2_0(), name, _state(plan))(attn, hidden, text)
            want = _literal_eq8(attn, hidden, text, ids, end_id, plan, cond_rows=[2, 3])
        rel = (got - want).norm() / want.norm()
        assert rel < 1e-5, f"{name}: relative difference {rel:.2e}"
        # and the inhibitor really changed the conditional rows
        with torch.no_grad():
            plain = AttnProcessor2_0()(attn, hidden, text)
        assert (got[2:] - plain[2:]).abs().max() > 1e-3


def test_unconditional_rows_untouched(sd_pipe):
    text, _ = _prompt_embeds(sd_pipe, ["a photo of a beach", "a cat"])
    plan = compile_plan(sd_pipe, [ConceptSpec("c", "cat", 5.0)], StepWindow(0.0, 1.0))
    name, attn = _layer(sd_pipe, 3)
    hidden = torch.randn(4, 16, attn.to_q.in_features)
    with torch.no_grad():
        got = GrowthInhibitorProcessor(AttnProcessor2_0(), name, _state(plan))(attn, hidden, text)
        plain = AttnProcessor2_0()(attn, hidden, text)
    torch.testing.assert_close(got[:2], plain[:2], rtol=0, atol=1e-6)
    assert (got[2:] - plain[2:]).abs().max() > 1e-3


def test_without_guidance_every_row_is_inhibited(sd_pipe):
    text, _ = _prompt_embeds(sd_pipe, ["a photo of a beach"])
    text = text[1:]  # conditional row only, as a pipeline with guidance off passes it
    plan = compile_plan(sd_pipe, [ConceptSpec("c", "beach", 5.0)], StepWindow(0.0, 1.0))
    name, attn = _layer(sd_pipe, 3)
    hidden = torch.randn(1, 16, attn.to_q.in_features)
    with torch.no_grad():
        got = GrowthInhibitorProcessor(AttnProcessor2_0(), name, _state(plan, cfg=False))(attn, hidden, text)
        plain = AttnProcessor2_0()(attn, hidden, text)
    assert (got - plain).abs().max() > 1e-3


def test_outside_the_window_the_layer_is_bit_identical(sd_pipe):
    text, _ = _prompt_embeds(sd_pipe, ["a photo of a beach"])
    plan = compile_plan(sd_pipe, [ConceptSpec("c", "beach", 5.0)], StepWindow(0.0, 0.5))
    name, attn = _layer(sd_pipe, 5)
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    for original in (AttnProcessor2_0(), AttnProcessor()):
        with torch.no_grad():
            got = GrowthInhibitorProcessor(original, name, _state(plan, active=False))(attn, hidden, text)
            plain = original(attn, hidden, text)
        assert torch.equal(got, plain)


def test_zero_scale_is_the_identity(sd_pipe):
    text, _ = _prompt_embeds(sd_pipe, ["a photo of a beach"])
    plan = compile_plan(sd_pipe, [ConceptSpec("c", "beach", 5.0)], StepWindow(0.0, 1.0))
    state = _state(plan)
    state.token_scales = torch.zeros_like(plan.token_scales)
    name, attn = _layer(sd_pipe, 9)
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    with torch.no_grad():
        got = GrowthInhibitorProcessor(AttnProcessor2_0(), name, state)(attn, hidden, text)
        plain = AttnProcessor2_0()(attn, hidden, text)
    torch.testing.assert_close(got, plain, rtol=0, atol=1e-6)
    # and a plan whose only concept has scale 0 installs nothing at all
    assert compile_plan(sd_pipe, [ConceptSpec("c", "beach", 0.0)], StepWindow()).is_empty


def test_attention_slicing_gives_the_same_result(sd_pipe):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    text, _ = _prompt_embeds(sd_pipe, ["a photo of a beach", "a cat on a sofa"])
    concepts = [ConceptSpec("a", "beach", 4.0), ConceptSpec("b", "cat", 2.0), ConceptSpec("c", "sofa", 1.0)]
    plan = compile_plan(sd_pipe, concepts, StepWindow(0.0, 1.0))
    name, attn = _layer(sd_pipe, 2)
    hidden = torch.randn(4, 16, attn.to_q.in_features)
    with torch.no_grad():
        whole = GrowthInhibitorProcessor(AttnProcessor2_0(), name, _state(plan))(attn, hidden, text)
        sliced = GrowthInhibitorProcessor(SlicedAttnProcessor(slice_size=1), name, _state(plan))(attn, hidden, text)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)
