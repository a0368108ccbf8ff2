"""The specificity options of a concept's map (plan.ConceptMap): calibrated, gated and
output maps against literal computations on real layers, the identities they must keep, and
guarded calls on every family that can run them."""

from __future__ import annotations

import math

import pytest
import torch

from gie_guard import ConfigurationError, Guard
from gie_guard.engine import ConceptSpec, StepWindow, compile_plan, guarded_call
from gie_guard.testing import dit
from gie_guard.testing.reference import engine_layer

PROMPT = "a photo of a nude person on a beach"


def _heads(x, heads):
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _literal_specific(attn, hidden, text, plan, rows, mode):
    """The layer's output with the concepts' specific inhibitors, written out: the concept's
    own softmax over its whole encoding (the paper's rule), the references' mean map on their
    own tokens as the level, relu(M - level) or M where the concept's mean own-token share
    (heads averaged) beats the level's; output: M where the pixel's attention output (the
    prompt's softmax times its values) is nearer the concept's mean own value than every
    reference's."""
    with torch.no_grad():
        plain = attn(hidden, encoder_hidden_states=text)
        q = _heads(attn.to_q(hidden[rows]), attn.heads)  # (B, h, N, d)
        scale = 1 / math.sqrt(q.shape[-1])

        def maps(states):
            k = _heads(attn.to_k(states[None]), attn.heads)  # (1, h, T, d)
            return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)

        level = torch.stack([maps(plan.reference_embeddings[r])[..., list(own)].mean(-1)
                             for r, own in enumerate(plan.reference_positions)]).mean(0)  # (B, h, N)

        def mean_value(states, own):
            return _heads(attn.to_v(states[None]), attn.heads)[0][:, list(own)].mean(1)  # (h, d)

        k_p, v_p = _heads(attn.to_k(text[rows]), attn.heads), _heads(attn.to_v(text[rows]), attn.heads)
        o = torch.softmax(q @ k_p.transpose(-1, -2) * scale, dim=-1) @ v_p  # (B, h, N, d)
        best_reference = torch.stack([torch.einsum("bhnd,hd->bn", o, mean_value(plan.reference_embeddings[r], own))
                                      for r, own in enumerate(plan.reference_positions)]).amax(0)
        delta = torch.zeros_like(q)
        for c in range(len(plan.concepts)):
            m = maps(plan.embeddings[c])
            own = list(plan.token_positions[c])
            if mode == "calibrated":
                a = torch.relu(m - level[..., None])
            elif mode == "output":
                near = torch.einsum("bhnd,hd->bn", o, mean_value(plan.embeddings[c], own)) > best_reference
                a = m * near.float()[:, None, :, None]
            else:
                a = m * (m[..., own].mean(-1).mean(1) > level.mean(1)).float()[:, None, :, None]
            v = _heads(attn.to_v(plan.embeddings[c][None]), attn.heads)
            delta += (a * plan.token_scales[c]) @ v
        b, h, n, d = delta.shape
        out = plain.clone()
        out[rows] -= delta.transpose(1, 2).reshape(b, n, h * d) @ attn.to_out[0].weight.T
    return out


@pytest.mark.parametrize("mode", ["calibrated", "gated", "output"])
def test_specific_maps_match_their_literal_computation(sd_pipe, mode):
    concepts = [ConceptSpec("nudity", "nude", 3.0), ConceptSpec("car", "red car", 6.0)]
    # against "a picture" the tiny model's output gate stays shut everywhere; against "thing"
    # it opens on some pixels of some layers, all of others: both branches of the gate
    references = ("thing",) if mode == "output" else ("thing", "a picture")
    plan = compile_plan(sd_pipe, concepts, StepWindow(0.0, 1.0), concept_map=mode, references=references)
    text = sd_pipe.encode_prompt(["a beach", PROMPT], "cpu", 1, False)[0]
    acting = []
    for index in (0, 3, 7, 11, 15):
        attn = sd_pipe.unet.get_submodule(plan.site_names[index])
        hidden = torch.randn(2, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(index))
        with torch.no_grad(), engine_layer(sd_pipe, plan, rows=[1]):
            got = attn(hidden, encoder_hidden_states=text)
        want = _literal_specific(attn, hidden, text, plan, [1], mode)
        with torch.no_grad():
            plain = attn(hidden, encoder_hidden_states=text)
        acting.append(float((want - plain).norm() / plain.norm()) > 1e-4)  # the inhibitor is not nothing
        assert float((got - want).norm() / plain.norm()) < 1e-5
        assert torch.equal(got[0], plain[0])  # the row without the prompt
    assert all(acting), acting


@pytest.mark.parametrize("mode", ["calibrated", "output"])
def test_a_word_against_itself_inhibits_nothing(sd_pipe, mode):
    guard = Guard(policy={"name": "self", "inhibit_steps": [0, 1], "concepts": [{"id": "c", "text": "beach", "scale": 8}]},
                  concept_map=mode, references=["beach"], exclusive=False)
    call = dict(prompt="a photo of a beach", num_inference_steps=2, output_type="np")
    plain = sd_pipe(generator=torch.Generator().manual_seed(0), **call).images
    out = guard(sd_pipe, generator=torch.Generator().manual_seed(0), **call)
    assert (out.images == plain).all()
    assert out.guard_report.steps_inhibited == ()  # a true report: nothing was subtracted


@pytest.mark.parametrize("mode", ["calibrated", "output"])
def test_a_specific_map_inhibits_against_the_neutral_references(sd_pipe, mode):
    policy = {"name": "p", "inhibit_steps": [0, 1], "concepts": [{"id": "c", "text": "beach", "scale": 8}]}
    call = dict(prompt="a photo of a beach", num_inference_steps=2, output_type="np")
    plain = sd_pipe(generator=torch.Generator().manual_seed(0), **call).images
    out = Guard(policy=policy, concept_map=mode, exclusive=False)(
        sd_pipe, generator=torch.Generator().manual_seed(0), **call)
    assert not (out.images == plain).all() and out.guard_report.steps_inhibited == (0, 1)


@pytest.mark.parametrize("build", [dit.tiny_sd3_pipeline, dit.tiny_flux_pipeline, dit.tiny_chroma_pipeline],
                         ids=["sd3", "flux", "chroma"])
@pytest.mark.parametrize("mode", ["calibrated", "gated", "output"])
def test_joint_families_run_every_map(build, mode):
    pipe = build()
    plan = compile_plan(pipe, [ConceptSpec("nude", "nude", 6.0)], StepWindow(0.0, 1.0), concept_map=mode,
                        options={"max_sequence_length": 48} if build is not dit.tiny_sd3_pipeline else None)
    assert plan.concept_map == mode and plan.reference_embeddings is not None
    call = dict(prompt=PROMPT, num_inference_steps=2, output_type="np", height=32, width=32)
    if build is not dit.tiny_sd3_pipeline:
        call["max_sequence_length"] = 48
    plain = pipe(generator=torch.Generator().manual_seed(0), **call).images
    with guarded_call(pipe, plan) as record:
        got = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert record.guarded_calls >= 2
    if record.steps_inhibited:  # a specific map may leave some steps untouched, and says so
        assert not (got == plain).all()
    else:
        assert float(abs(got - plain).max()) < 1e-5


def test_joint_output_gates_compare_image_outputs_with_the_carried_values():
    from gie_guard.engine.context import RideAlong
    from gie_guard.engine.joint import JointInhibitorProcessor

    pipe = dit.tiny_sd3_pipeline()
    plan = compile_plan(pipe, [ConceptSpec("a", "nude", 6.0), ConceptSpec("b", "red car", 4.0)], StepWindow(0.0, 1.0),
                        concept_map="output", references=("thing", "a picture"))
    carried = [*plan.ride_along, *plan.anchor_ride_along, *plan.reference_ride_along]
    bounds = torch.tensor([0, *[len(c) for c in carried]]).cumsum(0).tolist()
    ride = RideAlong(text_length=5, concept_length=bounds[-1], spans=tuple(zip(bounds[:-1], bounds[1:])))
    g = torch.Generator().manual_seed(4)
    o_image = torch.randn(2, 3, 16, 8, generator=g)  # (B_rows, h, N, d)
    values = torch.randn(2, 3, bounds[-1], 8, generator=g)  # the carried tokens' values at this block
    gates = JointInhibitorProcessor._output_gates(o_image, values, ride, plan)

    def mean_value(i, positions):
        lo, hi = ride.spans[i]
        cols = [j for j, slot in enumerate(carried[i]) if slot in set(positions)]
        return values[:, :, lo:hi][:, :, cols].mean(2)  # (B_rows, h, d)

    first_reference = len(plan.ride_along) + len(plan.anchor_ride_along)
    best = torch.stack([torch.einsum("bhnd,bhd->bn", o_image, mean_value(first_reference + r, pos))
                        for r, pos in enumerate(plan.reference_positions)]).amax(0)
    for c, positions in enumerate(plan.token_positions):
        want = torch.einsum("bhnd,bhd->bn", o_image, mean_value(c, positions)) > best
        assert torch.equal(gates[c], want)
        assert 0 < int(want.sum()) < want.numel()  # a gate open on some image tokens only


@pytest.mark.parametrize("build", [dit.tiny_pixart_pipeline, dit.tiny_sana_pipeline], ids=["pixart", "sana"])
def test_cross_attention_transformers_run_the_output_map(build):
    pipe = build()
    plan = compile_plan(pipe, [ConceptSpec("nude", "nude", 6.0)], StepWindow(0.0, 1.0), concept_map="output",
                        references=("thing",))
    assert plan.concept_map == "output"
    call = dict(prompt=PROMPT, num_inference_steps=2, output_type="np", height=32, width=32)
    plain = pipe(generator=torch.Generator().manual_seed(0), **call).images
    with guarded_call(pipe, plan) as record:
        got = pipe(generator=torch.Generator().manual_seed(0), **call).images
    # measured: against "thing" the gate opens at both steps of these tiny models
    assert record.guarded_calls >= 2 and list(record.steps_inhibited) == [0, 1]
    assert not (got == plain).all()


def test_map_options_are_checked(sd_pipe):
    with pytest.raises(ConfigurationError, match="concept_map"):
        Guard(policy="nsfw", concept_map="sharp")
    with pytest.raises(ConfigurationError, match="references"):
        Guard(policy="nsfw", references="thing")
    with pytest.raises(ConfigurationError, match="reference"):
        compile_plan(sd_pipe, [ConceptSpec("c", "beach", 3.0)], StepWindow(), concept_map="gated", references=())
