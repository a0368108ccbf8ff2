"""The shapes world, its detector and its trained pipeline (offline, real weights)."""

import re

import numpy as np
import pytest
import torch

from gie_guard.shapes import load_detector, load_pipeline
from gie_guard.shapes.detector import attribute_accuracy, render_labelled
from gie_guard.shapes.quality import attention_summary, concept_locality
from gie_guard.shapes.text_encoder import load_tokenizer
from gie_guard.shapes.world import (
    ATTRIBUTES,
    COLOURS,
    HELD_OUT_WORDS,
    SHAPES,
    STYLE_PHRASES,
    STYLES,
    TRAIN_WORDS,
    Scene,
    Thing,
    describe,
    render,
    sample_batch,
)

# measured on the shipped model for "a red circle" (docs/shapes.md): start 0.020, zero
# end/pad slots 0.868 together, "red" 0.024, "circle" 0.048; object/background ratio of
# "red" 1.26 and "circle" 1.32 in the 8x8 layers
MIN_NO_OP_SHARE = 0.8
MIN_LOCALITY = 1.15


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def test_render_is_deterministic_and_seed_dependent():
    a, sa, ca = sample_batch(16, np.random.default_rng(3), p_two=0.3)
    b, sb, cb = sample_batch(16, np.random.default_rng(3), p_two=0.3)
    c, _, _ = sample_batch(16, np.random.default_rng(4), p_two=0.3)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and sa == sb and ca == cb
    assert not np.array_equal(a, c)


def test_render_paints_the_named_colour():
    img = render(Scene((Thing("square", "blue", "plain"),)), np.random.default_rng(0))
    centre = img[14:18, 14:18].reshape(-1, 3).mean(0)
    assert centre[2] > 180 and centre[0] < 80  # blue, not background grey
    assert img[0, 0].min() > 200  # the corner is background


def test_vocabulary_tables_are_consistent():
    assert ATTRIBUTES == SHAPES + COLOURS + STYLES and len(SHAPES) >= 5 and len(COLOURS) >= 5
    train = {w for words in TRAIN_WORDS.values() for w in words}
    held = {w for words in HELD_OUT_WORDS.values() for w in words}
    assert set(TRAIN_WORDS) == set(ATTRIBUTES) and set(HELD_OUT_WORDS) <= set(ATTRIBUTES)
    assert all(TRAIN_WORDS[a][0] == a for a in ATTRIBUTES)  # canonical word first
    assert not train & held


def test_training_captions_never_use_held_out_words():
    held = {w for words in HELD_OUT_WORDS.values() for w in words}
    allowed = {w for words in TRAIN_WORDS.values() for w in words}
    allowed |= {w for phrases in STYLE_PHRASES.values() for p in phrases for w in p.split()}
    allowed |= {"a", "picture", "of", "and"}
    rng = np.random.default_rng(0)
    _, scenes, captions = sample_batch(500, rng, p_two=0.3, p_no_colour=0.1)
    for scene, caption in zip(scenes, captions):
        words = set(re.findall(r"[a-z]+", caption))
        assert words <= allowed, caption
        assert not words & held, caption
        for thing in scene.things:  # every shape is named
            assert words & set(TRAIN_WORDS[thing.shape]), caption


def test_held_out_captions_use_held_out_words():
    rng = np.random.default_rng(1)
    caption = describe(Scene((Thing("circle", "purple", "plain"),)), rng, held_out=True)
    assert "disk" in caption and "lavender" in caption


def test_tokenizer_marks_start_end_and_pad_as_special():
    tok = load_tokenizer()
    ids = tok("a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77
    assert {ids[0], ids[4], ids[-1]} <= set(tok.all_special_ids)
    assert not set(ids[1:4]) & set(tok.all_special_ids)


def test_detector_is_accurate_on_fresh_renders():
    images, labels = render_labelled(np.random.default_rng(12345), 200)
    acc = attribute_accuracy(load_detector(), images, labels)
    assert acc["mean"] >= 0.95, acc
    assert min(acc[a] for a in ATTRIBUTES) >= 0.9, acc


def test_detector_accepts_pil_images_and_returns_canonical_words():
    from PIL import Image

    img = render(Scene((Thing("star", "yellow", "striped"),)), np.random.default_rng(7))
    (found,) = load_detector()([Image.fromarray(img)])
    assert found == {"star", "yellow", "striped"}


def test_text_encoder_puts_the_sink_first_and_zeros_after_the_prompt(pipe):
    ids = pipe.tokenizer(["a red circle", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]  # (2, 77, 384)
    sink = pipe.text_encoder.sink
    assert torch.equal(hidden[0, 0], sink) and torch.equal(hidden[1, 0], sink)
    assert hidden[0, 1:4].norm(dim=-1).min() > 1  # real tokens carry MiniLM states
    assert hidden[0, 4:].abs().max() == 0 and hidden[1, 1:].abs().max() == 0


def test_pipeline_generates_the_prompted_image(pipe):
    image = pipe("a red circle", num_inference_steps=20, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    found = load_detector()([image])[0]
    assert {"red", "circle"} <= found, found


def test_attention_is_parked_on_the_sink_and_zero_slots(pipe):
    share = attention_summary(pipe, "a red circle")
    # start + end/pad slots: the positions that carry no prompt content
    assert share["start"] + share["end + pads"] >= MIN_NO_OP_SHARE, share
    # each concept token gets more than any single end/pad slot
    assert min(share["red"], share["circle"]) > share["end + pads"] / 74, share


def test_concept_tokens_attend_more_to_the_object_than_the_background(pipe):
    ratio = concept_locality(pipe, "a red circle")
    assert ratio["red"] >= MIN_LOCALITY and ratio["circle"] >= MIN_LOCALITY, ratio
