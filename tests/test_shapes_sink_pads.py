"""The sink-pads variant of the shapes UNet (docs/shapes.md, "The sink-pads variant"):
loading, the text encoder's pad modes, and a short generation (offline, real weights)."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gie_guard.shapes import load_pipeline
from gie_guard.shapes.dit_text import SinkClipTextEncoder, load_dit_tokenizer
from gie_guard.shapes.model import VARIANTS, WEIGHTS_DIR
from gie_guard.shapes.text_encoder import SinkTextConfig
from gie_guard.shapes.train import compress_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VARIANT_DIR = WEIGHTS_DIR / "sink-pads"


@pytest.fixture(scope="module")
def variant():
    return load_pipeline(variant="sink-pads")


@pytest.fixture(scope="module")
def shipped():
    return load_pipeline()


def _ids(pipe, prompt):
    tok = pipe.tokenizer
    return tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def test_variant_files_are_packaged_and_record_the_run():
    assert VARIANTS["sink-pads"] == VARIANT_DIR
    meta = json.loads((VARIANT_DIR / "model.json").read_text())
    assert meta["pad_mode"] == "sink" and meta["variant"] == "sink-pads"
    for key in ("unet_steps", "p_two", "final_loss", "wall_minutes", "warm_start"):
        assert key in meta, key
    assert meta["unet_steps"] > 0 and 0 < meta["p_two"] <= 1
    # float16, as train.py writes them
    assert all(v.dtype == torch.float16 for v in load_file(VARIANT_DIR / "unet.safetensors").values())
    assert not (VARIANT_DIR / "vae.safetensors").exists()  # the autoencoder is shared


def test_pad_positions_hold_the_sink_in_sink_mode(variant):
    enc = variant.text_encoder
    assert enc.config.pad_mode == "sink"
    ids = _ids(variant, "a blue striped star")
    with torch.no_grad():
        hidden = enc(ids).last_hidden_state[0]
    tok = variant.tokenizer
    start = ids[0] == tok.cls_token_id
    end_or_pad = (ids[0] == tok.sep_token_id) | (ids[0] == tok.pad_token_id)
    real = ~torch.isin(ids[0], torch.tensor(tok.all_special_ids))
    assert start.sum() == 1 and end_or_pad.sum() == 77 - 1 - 4 and real.sum() == 4
    sink = enc.sink.detach()
    assert torch.equal(hidden[start | end_or_pad], sink.expand(73, -1))
    # real tokens carry MiniLM's states, not the sink
    states = enc.token_states(ids)[0]
    assert torch.equal(hidden[real], states[real])
    assert sink.norm() > 1.0


def test_pad_positions_are_zero_in_zero_mode(shipped, variant):
    enc = shipped.text_encoder
    assert enc.config.pad_mode == "zero"
    ids = _ids(shipped, "a blue striped star")
    with torch.no_grad():
        hidden = enc(ids).last_hidden_state[0]
        variant_hidden = variant.text_encoder(ids).last_hidden_state[0]
    tok = shipped.tokenizer
    end_or_pad = (ids[0] == tok.sep_token_id) | (ids[0] == tok.pad_token_id)
    assert torch.equal(hidden[0], enc.sink.detach())
    assert not hidden[end_or_pad].any()
    # same MiniLM states for the real tokens in both modes
    real = ~torch.isin(ids[0], torch.tensor(tok.all_special_ids))
    assert torch.equal(hidden[real], variant_hidden[real])


def test_dit_encoders_keep_zero_pads(variant):
    tokenizer = load_dit_tokenizer()
    enc = SinkClipTextEncoder.create(tokenizer, bert=variant.text_encoder.bert)
    assert enc.config.pad_mode == "zero"
    with torch.no_grad():
        enc.sink.copy_(torch.randn(384))
    ids = tokenizer("a red circle", padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        out = enc(ids, output_hidden_states=True)
    pads = (ids[0] == tokenizer.sep_token_id) | (ids[0] == tokenizer.pad_token_id)
    for states in out.hidden_states:
        assert torch.equal(states[0, 0], enc.sink.detach())
        assert not states[0, pads].any()


def test_unknown_pad_mode_is_refused():
    with pytest.raises(ValueError, match="pad_mode"):
        SinkTextConfig(pad_mode="copies")


def test_default_loading_is_unchanged(shipped, variant):
    unet_state = shipped.unet.state_dict()
    for name, tensor in load_file(WEIGHTS_DIR / "unet.safetensors").items():
        assert torch.equal(unet_state[name], tensor.float()), name
    assert torch.equal(shipped.text_encoder.sink.detach(), load_file(WEIGHTS_DIR / "sink.safetensors")["sink"].float())
    meta = json.loads((WEIGHTS_DIR / "model.json").read_text())
    assert shipped.vae.config.scaling_factor == meta["scaling_factor"]
    # the variant: its own UNet and sink, the shared autoencoder and scaling factor
    assert variant.vae.config.scaling_factor == meta["scaling_factor"]
    variant_vae = variant.vae.state_dict()
    for name, tensor in shipped.vae.state_dict().items():
        assert torch.equal(variant_vae[name], tensor), name
    assert not torch.equal(variant.unet.conv_in.weight, shipped.unet.conv_in.weight)
    assert not torch.equal(variant.text_encoder.sink, shipped.text_encoder.sink)
    explicit = load_pipeline(variant="default")
    assert torch.equal(explicit.unet.conv_in.weight, shipped.unet.conv_in.weight)


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="'default'.*'sink-pads'"):
        load_pipeline(variant="global")
    with pytest.raises(ValueError, match="unet"):
        load_pipeline(backbone="dit", variant="sink-pads")


def test_short_generation_with_the_variant(variant):
    images = variant(["a red circle", "a blue striped star"], num_inference_steps=2, guidance_scale=5.0,
                   generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np").images
    assert images.shape == (2, 32, 32, 3)
    assert np.isfinite(images).all()


def test_training_context_compression_matches_the_full_context(variant):
    """train.py folds the repeated pad slots into one with a ln(k) logit bonus."""
    prompts = ["a red circle", "", "a green dotted square and a purple plain cross"]
    ids = torch.cat([_ids(variant, p) for p in prompts])
    with torch.no_grad():
        context = variant.text_encoder(ids).last_hidden_state
        short, mask = compress_context(ids, context, variant.tokenizer.pad_token_id)
        assert mask is not None and short.shape[1] < 20
        assert math.isclose(float(mask[0, -1]), 1 + math.log(77 - short.shape[1] + 1) / 1e4, rel_tol=1e-6)
        x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([10, 500, 990])
        full = variant.unet(x, t, context).sample
        folded = variant.unet(x, t, short, encoder_attention_mask=mask).sample
    assert (full - folded).abs().max() < 1e-3
