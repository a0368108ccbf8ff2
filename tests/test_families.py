"""Pipeline families: concept tokens from real tokenizers' special ids, never CLIP's ids."""

import numpy as np
import pytest
import torch

from gie_guard import Guard
from gie_guard.engine import family_for
from gie_guard.testing import tiny_clip_tokenizer, tiny_sd_pipeline


def concept_token_positions(pipe, text, concept_id):
    family = family_for(pipe)
    return family.positions(pipe, text, concept_id, family.encoding_options(pipe, {}))


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"], ids=["sd1-pads-with-end-token", "sd2-pads-with-!"])
def test_clip_tokenizer_concept_tokens(pad):
    pipe = tiny_sd_pipeline(tokenizer=tiny_clip_tokenizer(pad_token=pad))
    tok = pipe.tokenizer
    ids = tok("van gogh", padding="max_length", max_length=77).input_ids
    assert ids[0] == tok.bos_token_id and ids[3] == tok.eos_token_id
    assert ids[4] == tok.pad_token_id  # padding starts after the end token
    assert tok.pad_token_id == (tok.eos_token_id if pad == "<|endoftext|>" else 0)
    assert concept_token_positions(pipe, "van gogh", "style") == (1, 2)
    # a word outside the tiny vocabulary falls apart into several tokens; all are kept
    assert concept_token_positions(pipe, "zebra", "z") == tuple(range(1, 1 + len(tok.tokenize("zebra"))))


def test_bert_tokenizer_concept_tokens(sd_pipe):
    tok = sd_pipe.tokenizer  # [CLS] ... [SEP] [PAD]...: other ids, same roles
    assert tok.cls_token_id != 49406
    assert concept_token_positions(sd_pipe, "nude", "n") == (1,)
    assert concept_token_positions(sd_pipe, "Vincent van Gogh", "v") == tuple(range(1, 1 + len(tok.tokenize("Vincent van Gogh"))))


def test_sd2_style_pipeline_is_guarded():
    pipe = tiny_sd_pipeline(tokenizer=tiny_clip_tokenizer(pad_token="!"))
    guard = Guard(policy={"name": "p", "concepts": [{"id": "nudity", "text": "nude", "scale": 6.0}], "inhibit_steps": [0, 1]})
    call = dict(prompt="a photo of a nude person", num_inference_steps=3, output_type="np")
    guarded = guard(pipe, generator=torch.Generator().manual_seed(0), **call).images
    plain = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert guard.last_report.concepts[0].token_positions == (1,)
    assert np.abs(guarded - plain).max() > 1e-3
