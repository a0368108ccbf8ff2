"""Chroma (``ChromaPipeline``, ``ChromaImg2ImgPipeline``) on tiny random-weight pipelines: the
family is found, concepts are encoded and carried as Chroma's mask makes a prompt's tokens real,
an empty policy leaves the call bit-identical, and riding concepts extend the text states, the
text positions and the attention mask at the right place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gie_guard import Guard
from gie_guard.engine import ConceptSpec, StepWindow, compile_plan, family_for
from gie_guard.engine.families.chroma import Chroma
from gie_guard.testing import dit

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


def test_a_guarded_call_with_concepts_is_withheld_not_run_unmasked(chroma):
    """Until the joint site takes Chroma's mask, a call that would inhibit fails closed."""
    from gie_guard import GuardedCallError

    with pytest.raises(GuardedCallError, match="attention mask"):
        run(chroma, Guard(policy=STRONG))
