"""Chroma (``ChromaPipeline``, ``ChromaImg2ImgPipeline``) on tiny random-weight pipelines: the
family is found, concepts are encoded and carried as Chroma's mask makes a prompt's tokens real,
an empty policy leaves the call bit-identical, riding concepts extend the text states, the text
positions and the attention mask at the right place; and the joint site under Chroma's mask
(float 0/1 as diffusers 0.42 passes it, and boolean): the prompt's streams equal the block's own
processor with concepts riding at w=0, the image rows match a literal masked reference (image
and prompt sinks), whole calls at w=0 equal the unguarded call, and guarded calls erase."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gie_guard import Guard
from gie_guard.engine import ConceptSpec, StepWindow, compile_plan, family_for
from gie_guard.engine.families.chroma import Chroma
from gie_guard.testing import dit
from gie_guard.testing.reference import (
    engine_layer,
    flux_rotary,
    joint_inputs,
    random_norms,
    relative_difference,
)

SETTINGS = dict(height=32, width=32, max_sequence_length=48)
PROMPT = "a photo of a nude person on a beach"
STRONG = {"name": "strong", "inhibit_steps": [0.0, 1.0], "concepts": [{"id": "nude", "text": "nude", "scale": 6.0}]}
CONCEPTS = [ConceptSpec("nude", "nude", 3.0), ConceptSpec("car", "red car", 7.0)]


@pytest.fixture(scope="module")
def chroma():
    return dit.tiny_chroma_pipeline()


def run(pipe, guard=None, *, seed=0, steps=2, **extra):
    call = dict(prompt=PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="np", **SETTINGS, **extra)
    return guard(pipe, **call) if guard is not None else pipe(**call)


def _denoiser_calls(pipe, **extra):
    seen = []

    def record(_module, _args, kwargs):
        seen.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run(pipe, **extra)
    finally:
        handle.remove()
    return seen


# -- the tiny pipeline ------------------------------------------------------------------------------


def test_tiny_chroma_generates_unguarded_with_a_mask_over_text_then_image(chroma):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    assert type(chroma) is ChromaPipeline and isinstance(chroma.transformer, ChromaTransformer2DModel)
    assert len(chroma.transformer.transformer_blocks) == 2 and len(chroma.transformer.single_transformer_blocks) == 2
    assert all(type(p) is FluxAttnProcessor for p in chroma.transformer.attn_processors.values())
    calls = _denoiser_calls(chroma)
    assert len(calls) == 4  # 2 steps x (prompt, negative prompt): CFG is a second call, not a batch
    first = calls[0]
    t = first["encoder_hidden_states"].shape[1]
    n = first["hidden_states"].shape[1]
    assert t == 48 and n == 256 and first["attention_mask"].shape == (1, t + n)
    real = len(chroma.tokenizer(PROMPT).input_ids)  # own tokens and the end token
    mask = first["attention_mask"][0]
    assert mask[: real + 1].eq(1).all() and mask[real + 1 : t].eq(0).all() and mask[t:].eq(1).all()  # one pad
    image = run(chroma).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and image.std() > 0


def test_tiny_chroma_img2img_generates_unguarded():
    from diffusers import ChromaImg2ImgPipeline

    pipe = dit.tiny_chroma_pipeline("img2img")
    assert type(pipe) is ChromaImg2ImgPipeline
    start = np.full((32, 32, 3), 0.5, dtype=np.float32)
    out = run(pipe, image=start, strength=0.75, steps=4).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


# -- the family -------------------------------------------------------------------------------------


def test_the_chroma_family_guards_both_chroma_pipelines_and_lists_its_sites(chroma):
    family = family_for(chroma)
    assert isinstance(family, Chroma) and family.name == "chroma" and family.joint and family.text_first
    assert isinstance(family_for(dit.tiny_chroma_pipeline("img2img")), Chroma)
    sites = family.sites(chroma)
    assert [(s.name, s.kind, s.block) for s in sites] == [
        ("transformer_blocks.0.attn", "joint", 0), ("transformer_blocks.1.attn", "joint", 1),
        ("single_transformer_blocks.0.attn", "single", 2), ("single_transformer_blocks.1.attn", "single", 3),
    ]
    assert family.encoding_options(chroma, {}) == {"max_sequence_length": 512}  # the pipeline's default
    assert family.encoding_options(chroma, {"max_sequence_length": 48}) == {"max_sequence_length": 48}


def test_concept_slots_are_its_t5_tokens_and_the_end_token_and_one_pad_ride_along(chroma):
    plan = compile_plan(chroma, CONCEPTS, StepWindow(0.0, 1.0), options={"max_sequence_length": 48})
    tokenizer = chroma.tokenizer
    for c, concept in enumerate(CONCEPTS):
        ids = tokenizer(concept.text).input_ids
        assert ids[-1] == tokenizer.eos_token_id
        own = tuple(range(len(ids) - 1))  # T5 has no start token: own tokens from slot 0
        assert plan.token_positions[c] == own
        assert plan.ride_along[c] == own + (len(ids) - 1, len(ids))  # + end token + the one visible pad
        assert plan.token_scales[c, list(own)].eq(concept.scale).all()
        assert plan.token_scales[c].count_nonzero() == len(own)
    # the embeddings are the pipeline's own encode_prompt's, the concept as the prompt
    want = chroma.encode_prompt(prompt=["red car"], do_classifier_free_guidance=False, max_sequence_length=48)[0]
    assert torch.equal(plan.embeddings[1], want[0])
    assert plan.embeddings.shape == (2, 48, dit._CHROMA_T5_HIDDEN)


def test_prompt_embeddings_are_read_from_chromas_encode_prompt(chroma):
    family = family_for(chroma)
    result = chroma.encode_prompt(prompt=[PROMPT], negative_prompt="blurry", max_sequence_length=48)
    prompt, negative = family.prompt_embeddings(result, 0)
    assert prompt is result[0] and negative is result[3] and not torch.equal(prompt, negative)


def test_ride_along_appends_text_positions_and_mask_after_the_prompt_before_the_image(chroma):
    calls = _denoiser_calls(chroma)
    kwargs = calls[0]
    t = kwargs["encoder_hidden_states"].shape[1]
    tokens = torch.randn(5, kwargs["encoder_hidden_states"].shape[-1])
    _, new = family_for(chroma).ride_along((), kwargs, tokens)
    assert torch.equal(new["encoder_hidden_states"][:, :t], kwargs["encoder_hidden_states"])
    assert torch.equal(new["encoder_hidden_states"][0, t:], tokens)
    assert new["txt_ids"].shape == (t + 5, 3) and new["txt_ids"][t:].eq(0).all()
    mask, old = new["attention_mask"], kwargs["attention_mask"]
    assert mask.shape == (1, old.shape[1] + 5) and mask.dtype == old.dtype
    assert torch.equal(mask[:, :t], old[:, :t])  # the prompt's text mask, unchanged
    assert mask[:, t : t + 5].eq(1).all()  # the carried tokens are real tokens
    assert torch.equal(mask[:, t + 5 :], old[:, t:])  # then the image's
    assert torch.equal(new["img_ids"], kwargs["img_ids"])
    # a call without a mask (none given) stays without one
    _, bare = family_for(chroma).ride_along((), {**kwargs, "attention_mask": None}, tokens)
    assert bare["attention_mask"] is None


def test_empty_policy_and_zero_scale_leave_the_output_bit_identical(chroma):
    plain = run(chroma).images
    for policy in ({"name": "empty", "concepts": []},
                   {"name": "zero", "concepts": [{"id": "nude", "text": "nude", "scale": 0.0}]}):
        out = run(chroma, Guard(policy=policy))
        assert np.array_equal(out.images, plain), policy["name"]
        assert out.guard_report.family == "chroma"


def test_chroma_inpaint_is_refused_by_name():
    import diffusers

    from gie_guard import UnsupportedPipelineError

    with pytest.raises(UnsupportedPipelineError, match="Chroma's inpainting pipeline"):
        family_for(object.__new__(diffusers.ChromaInpaintPipeline))


# -- phase B: the joint site with Chroma's mask ------------------------------------------------------


@pytest.fixture(scope="module")
def chroma_norms():
    pipe = dit.tiny_chroma_pipeline()
    random_norms(pipe.transformer)
    return pipe


def _pairs(m: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B, 1, S, S) as every Chroma block makes it: m_i * m_j."""
    return m[:, None, None, :] * m[:, None, :, None]


def _sdpa_bias(m_q: torch.Tensor, m_k: torch.Tensor) -> torch.Tensor:
    """What scaled-dot-product attention adds for queries ``m_q`` and keys ``m_k`` of a Chroma
    mask: ``m_i * m_j`` itself when float, 0 / -inf when boolean."""
    pairs = m_q[:, None] * m_k[None, :]
    if pairs.dtype == torch.bool:
        return torch.zeros(pairs.shape).masked_fill(~pairs, float("-inf"))
    return pairs.float()


@torch.no_grad()
def literal_masked_joint_attention(attn, image, text, states, weights, rows, mask, *, single, rotary, sink="image"):
    """One Chroma block with GIE, by hand, row by row: the image tokens' attention outputs
    (before ``to_out``) and, per concept, its carried tokens' outputs. ``mask`` ``(B, T + sum
    T_c + N)`` is the transformer's mask after the ride-along (prompt text, carried tokens,
    image); every pair of tokens gets SDPA's reading of ``m_i * m_j``. Prompt queries see image
    and prompt keys only; for ``rows`` the image queries' map gets each concept's columns at
    ``-w M_c``, ``M_c = exp(s_c) / (Z_sink + sum_c exp(s_c))`` (each logit with its bias), the
    sink being the image keys (``sink="image"``) or image and prompt keys (``"prompt"``, where a
    masked key must not count); a concept's tokens attend over ``[image; their own]``."""

    def project(x, text_side):
        added = text_side and not single
        to_q, to_k, to_v = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if added else (attn.to_q, attn.to_k, attn.to_v)
        norm_q = attn.norm_added_q if added else attn.norm_q
        norm_k = attn.norm_added_k if added else attn.norm_k
        q, k, v = (t.view(t.shape[0], attn.heads, -1) for t in (to_q(x), to_k(x), to_v(x)))
        return norm_q(q), norm_k(k), v

    def rope(x, at):
        from diffusers.models.embeddings import apply_rotary_emb

        cos, sin = rotary
        return apply_rotary_emb(x[None], (cos[at], sin[at]), sequence_dim=1)[0]

    n, t = image.shape[1], text.shape[1]
    t_c = [s.shape[1] for s in states]
    t_all = t + sum(t_c)
    out_image, out_concepts = [], [[] for _ in states]
    for b in range(image.shape[0]):
        m = mask[b]
        m_txt, m_img = m[:t], m[t_all:]
        qi, ki, vi = project(image[b], False)
        qt, kt, vt = project(text[b], True)
        qi, ki = rope(qi, slice(t_all, t_all + n)), rope(ki, slice(t_all, t_all + n))
        kt = rope(kt, slice(0, t))
        qi, ki, vi, kt, vt = (x.transpose(0, 1) for x in (qi, ki, vi, kt, vt))  # (h, S, d)
        d = qi.shape[-1]
        keys, values = torch.cat([kt, ki], dim=1), torch.cat([vt, vi], dim=1)
        logits = qi @ keys.transpose(-1, -2) / math.sqrt(d) + _sdpa_bias(m_img, torch.cat([m_txt, m_img]))
        maps = torch.softmax(logits, dim=-1)
        for c, (st, w) in enumerate(zip(states, weights)):
            lo = t + sum(t_c[:c])
            m_c = m[lo : lo + t_c[c]]
            qc, kc, vc = project(st[b], True)
            qc, kc = rope(qc, slice(lo, lo + t_c[c])), rope(kc, slice(lo, lo + t_c[c]))
            qc, kc, vc = (x.transpose(0, 1) for x in (qc, kc, vc))
            own = torch.softmax(qc @ torch.cat([ki, kc], dim=1).transpose(-1, -2) / math.sqrt(d)
                                + _sdpa_bias(m_c, torch.cat([m_img, m_c])), dim=-1)
            out_concepts[c].append((own @ torch.cat([vi, vc], dim=1)).transpose(0, 1).reshape(t_c[c], -1))
            if b in rows:
                lc = qi @ kc.transpose(-1, -2) / math.sqrt(d) + _sdpa_bias(m_img, m_c)
                sink_logits = logits[..., t:] if sink == "image" else logits  # image keys, or all the prompt's
                mc = torch.exp(lc - torch.logsumexp(torch.cat([sink_logits, lc], dim=-1), dim=-1, keepdim=True))
                maps = torch.cat([maps, -w * mc], dim=-1)
                values = torch.cat([values, vc], dim=1)
        out_image.append((maps @ values).transpose(0, 1).reshape(n, -1))
    return torch.stack(out_image), [torch.stack(o) for o in out_concepts]


def _block_case(pipe, site, dtype, sink=None):
    """A Chroma block, random inputs for two rows (row 0 the negative prompt's, row 1 the
    prompt's) with Chroma-style text masks of different lengths, and the concepts riding."""
    plan = compile_plan(pipe, CONCEPTS, StepWindow(0.0, 1.0), options={"max_sequence_length": 48}, sink=sink)
    attn = pipe.transformer.get_submodule(site)
    single = site.startswith("single")
    image, text, states, weights = joint_inputs(attn, plan, n=16, single=single)
    t, n = text.shape[1], image.shape[1]
    t_all = t + sum(s.shape[1] for s in states)
    text_mask = torch.zeros(2, t)
    text_mask[0, :5] = 1  # the negative prompt: 3 tokens, its end token, one pad
    text_mask[1, :9] = 1  # the prompt: 7 tokens, its end token, one pad
    plain_mask = torch.cat([text_mask, torch.ones(2, n)], dim=1).to(dtype)
    riding_mask = torch.cat([text_mask, torch.ones(2, t_all - t), torch.ones(2, n)], dim=1).to(dtype)
    return plan, attn, single, image, text, states, weights, plain_mask, riding_mask


def _own_block(attn, single, image, text, rotary, mask):
    """The block's own processor on the prompt alone: (image outputs, text outputs)."""
    t = text.shape[1]
    with torch.no_grad():
        mask4 = None if mask is None else _pairs(mask)
        if single:
            out = attn.processor(attn, hidden_states=torch.cat([text, image], dim=1), attention_mask=mask4,
                                 image_rotary_emb=rotary)
            return out[:, t:], out[:, :t]
        return attn.processor(attn, hidden_states=image, encoder_hidden_states=text, attention_mask=mask4,
                              image_rotary_emb=rotary)


def _engine_block(pipe, plan, attn, single, image, text, states, rotary, mask, *, scales=None):
    t_all = text.shape[1] + sum(s.shape[1] for s in states)
    with torch.no_grad(), engine_layer(pipe, plan, rows=[1], text_length=text.shape[1], scales=scales):
        if single:
            out = attn(hidden_states=torch.cat([text, *states, image], dim=1), attention_mask=_pairs(mask),
                       image_rotary_emb=rotary)
            return out[:, t_all:], out[:, :t_all]
        return attn(hidden_states=image, encoder_hidden_states=torch.cat([text, *states], dim=1),
                    attention_mask=_pairs(mask), image_rotary_emb=rotary)


SITES = ["transformer_blocks.1.attn", "single_transformer_blocks.0.attn"]
# float: the 0/1 mask diffusers 0.42 passes (added to the logits); bool: a mask that removes the pads
MASKS = [torch.float32, torch.bool]


@pytest.mark.parametrize("dtype", MASKS, ids=["float-mask", "bool-mask"])
@pytest.mark.parametrize("site", SITES)
def test_chroma_blocks_keep_the_masked_prompt_attention_with_concepts_riding_at_w0(chroma_norms, site, dtype):
    """Concepts riding at w=0: the prompt's text and image rows equal the block's own processor
    under the pipeline's mask, every row (relative 1e-6)."""
    pipe = chroma_norms
    plan, attn, single, image, text, states, _, plain_mask, riding_mask = _block_case(pipe, site, dtype)
    t, n = text.shape[1], image.shape[1]
    t_all = riding_mask.shape[1] - n
    plain_image, plain_text = _own_block(attn, single, image, text, flux_rotary(pipe, t, n), plain_mask)
    unmasked_image, _ = _own_block(attn, single, image, text, flux_rotary(pipe, t, n), None)
    assert relative_difference(unmasked_image, plain_image) > 1e-3  # the mask matters here: ignoring it would show
    zero = torch.zeros_like(plan.token_scales)
    got_image, got_text = _engine_block(pipe, plan, attn, single, image, text, states, flux_rotary(pipe, t_all, n),
                                        riding_mask, scales=zero)
    assert relative_difference(got_image, plain_image) <= 1e-6, f"{site}: the prompt's image rows"
    assert relative_difference(got_text[:, :t], plain_text) <= 1e-6, f"{site}: the prompt's text rows"


@pytest.mark.parametrize("sink", ["image", "prompt"])
@pytest.mark.parametrize("dtype", MASKS, ids=["float-mask", "bool-mask"])
@pytest.mark.parametrize("site", SITES)
def test_chroma_blocks_match_the_literal_masked_reference(chroma_norms, site, dtype, sink):
    pipe = chroma_norms
    plan, attn, single, image, text, states, weights, plain_mask, riding_mask = _block_case(pipe, site, dtype, sink)
    t, n = text.shape[1], image.shape[1]
    t_all = riding_mask.shape[1] - n
    rotary = flux_rotary(pipe, t_all, n)
    plain_image, plain_text = _own_block(attn, single, image, text, flux_rotary(pipe, t, n), plain_mask)
    got_image, got_text = _engine_block(pipe, plan, attn, single, image, text, states, rotary, riding_mask)
    want_image, want_concepts = literal_masked_joint_attention(attn, image, text, states, weights, [1], riding_mask,
                                                               single=single, rotary=rotary, sink=sink)
    with torch.no_grad():
        want_concepts = torch.cat(want_concepts, dim=1)
        if not single:
            want_image, want_concepts = attn.to_out[0](want_image), attn.to_add_out(want_concepts)
    assert relative_difference(want_image[1], plain_image[1]) > 1e-3  # the inhibitor is not nothing
    assert relative_difference(got_image, want_image) < 1e-5, f"{site}: image rows against the literal reference"
    assert relative_difference(got_image[0], plain_image[0]) <= 1e-6, f"{site}: the negative row is the block's own output"
    assert relative_difference(got_text[:, :t], plain_text) <= 1e-6, f"{site}: the prompt's text stream changed"
    assert relative_difference(got_text[1:, t:], want_concepts[1:]) < 1e-5, f"{site}: the concept tokens' stream"


def test_guarded_chroma_erases_and_reports_inhibited_steps_leaving_the_negative_call_alone(chroma):
    model = chroma.transformer
    before = dict(model.attn_processors)
    plain = run(chroma).images
    out = run(chroma, Guard(policy=STRONG))
    report = out.guard_report
    assert np.abs(out.images - plain).max() > 1e-4
    assert report.family == "chroma" and report.steps_inhibited == (0, 1) and report.total_steps == 2
    # two denoiser calls a step: the prompt's (guarded) and the negative prompt's (left alone)
    assert report.denoiser_calls == 4 and report.rows_guarded == ((1, (0,)), (1, ()))
    assert all(model.attn_processors[k] is p for k, p in before.items())
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0
    assert np.array_equal(run(chroma).images, plain)  # nothing left behind


def test_guarded_chroma_img2img_erases():
    pipe = dit.tiny_chroma_pipeline("img2img")
    start = np.full((32, 32, 3), 0.5, dtype=np.float32)
    plain = run(pipe, image=start, strength=0.75, steps=4).images
    out = run(pipe, Guard(policy=STRONG), image=start, strength=0.75, steps=4)
    assert out.guard_report.family == "chroma" and out.guard_report.steps_inhibited == (0, 1, 2)
    assert np.abs(out.images - plain).max() > 1e-4
