"""The optional context-mixing layer on the shapes UNet's text states (docs/shapes.md, "A
context-mixing layer"): off by default and then exactly today's encoder, the identity at
initialisation, and saved and loaded with a training run's sink file."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gie_guard.shapes import load_pipeline
from gie_guard.shapes.model import WORLDS
from gie_guard.shapes.text_encoder import SinkTextEncoder, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a red circle on the left and a blue square on the right", "a green striped triangle", ""]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _ids(tokenizer):
    return tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _states(encoder, ids):
    with torch.no_grad():
        return encoder.eval()(ids).last_hidden_state


def test_without_mixing_the_encoder_is_todays(tokenizer):
    sink = load_file(WORLDS["two"] / "sink.safetensors")["sink"].float()
    encoder = SinkTextEncoder.create(tokenizer)
    assert encoder.mixer is None and encoder.config.mix_layers == 0 and encoder.mixer_state() == {}
    encoder.sink.data.copy_(sink)
    ids = _ids(tokenizer)
    # today's forward: MiniLM's last states assembled with the sink, nothing in between
    expected = encoder.assemble(ids, encoder.token_states(ids))
    assert torch.equal(_states(encoder, ids), expected)
    # the shipped two-cell model (no mix_layers in its model.json) loads as before
    pipe = load_pipeline(world="two")
    assert pipe.text_encoder.mixer is None
    assert torch.equal(_states(pipe.text_encoder, ids), _states(encoder, ids))


def test_mixing_starts_as_the_identity(tokenizer):
    plain = SinkTextEncoder.create(tokenizer)
    mixed = SinkTextEncoder.create(tokenizer, mix_layers=1)
    sink = torch.randn(384)
    plain.sink.data.copy_(sink)
    mixed.sink.data.copy_(sink)
    assert len(mixed.mixer.layers) == 1 and mixed.mixer.position.shape == (tokenizer.model_max_length, 384)
    ids = _ids(tokenizer)
    assert torch.equal(_states(mixed, ids), _states(plain, ids))
    # and it can learn: the zero output projections get gradients
    mixed.train()
    mixed(ids).last_hidden_state.pow(2).sum().backward()
    assert mixed.mixer.layers[0].linear2.weight.grad.abs().sum() > 0


def test_a_run_folder_round_trips_the_mixer(tokenizer, tmp_path):
    two = WORLDS["two"]
    for name in ("unet.safetensors", "model.json"):
        (tmp_path / name).write_bytes((two / name).read_bytes())
    meta = json.loads((two / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps(dict(meta, mix_layers=1)))
    encoder = SinkTextEncoder.create(tokenizer, mix_layers=1)
    encoder.sink.data.copy_(load_file(two / "sink.safetensors")["sink"].float())
    with torch.no_grad():  # a trained mixer: nothing is zero any more
        for p in encoder.mixer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_file({"sink": encoder.sink.detach(), **{k: v.contiguous() for k, v in encoder.mixer_state().items()}},
              tmp_path / "sink.safetensors")
    pipe = load_pipeline(world="two", weights_dir=tmp_path)
    loaded = pipe.text_encoder
    assert loaded.mixer is not None
    for key, value in encoder.mixer_state().items():
        assert torch.equal(loaded.mixer_state()[key], value), key
    ids = _ids(tokenizer)
    assert torch.allclose(_states(loaded, ids), _states(encoder, ids), atol=1e-6)
    # a non-zero mixer changes the text states against the shipped encoder
    shipped = load_pipeline(world="two").text_encoder
    assert not torch.allclose(_states(loaded, ids), _states(shipped, ids), atol=1e-3)
    # a mixer in the sink file with mix_layers 0 in model.json is refused
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="mix_layers"):
        load_pipeline(world="two", weights_dir=tmp_path)


def test_trainer_with_mixing_writes_a_loadable_model(tmp_path):
    from gie_guard.shapes.train_two import main

    main(["--out", str(tmp_path), "--pool", "16", "--steps", "2", "--batch", "4", "--save-every", "2",
          "--mix-layers", "1", "--warm-start", str(WORLDS["two"])])
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["mix_layers"] == 1 and meta["steps"] == 2
    saved = load_file(tmp_path / "sink.safetensors")
    pipe = load_pipeline(world="two", weights_dir=tmp_path)
    for key, value in pipe.text_encoder.mixer_state().items():
        assert torch.equal(value, saved[key].float()), key
    out = pipe("a red circle on the left", num_inference_steps=2, output_type="latent").images
    assert out.shape == (1, 4, 8, 16) and torch.isfinite(out).all()
