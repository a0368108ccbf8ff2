"""Adapter file format: round trip, refusals with clear errors, the non-finite rule."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from gie_guard import AdapterError
from gie_guard.adapters import (
    Fingerprint,
    MLPAdapter,
    ScaleMLP,
    load_adapter,
    read_header,
    resolve_scales,
    save_adapter,
)
from gie_guard.adapters.format import METADATA_KEY
from gie_guard.engine import family_for


def make_adapter(fingerprint, *, categories=("object",), name="beach", concepts=("beach",), seed=0, scale_range=(1.0, 9.0)):
    torch.manual_seed(seed)
    n = fingerprint.layer_count
    return MLPAdapter(name, fingerprint, categories, scale_range, ScaleMLP(n).eval(), torch.rand(n) * 0.02, torch.rand(n) * 0.01 + 0.001,
                      concepts=concepts, training={"prompts": 3})


@pytest.fixture(scope="module")
def sd_fingerprint(sd_pipe):
    return Fingerprint.of_pipeline(sd_pipe)


def test_fingerprint_is_the_ordered_cross_attention_layers(sd_pipe, sd_fingerprint):
    assert sd_fingerprint.layer_count == 16
    sites = family_for(sd_pipe).sites(sd_pipe)
    assert sd_fingerprint.layer_names == tuple(f"{s.name}.processor" for s in sites)  # the engine's (processor) order
    assert all(name.endswith("attn2.processor") for name in sd_fingerprint.layer_names)
    assert set(sd_fingerprint.cross_attention_dims) == {32}


def test_round_trip_keeps_predictions_and_metadata(tmp_path, sd_fingerprint):
    adapter = make_adapter(sd_fingerprint)
    path = save_adapter(adapter, tmp_path / "beach.safetensors")
    loaded = load_adapter(path)
    x = torch.rand(5, 16) * 0.03
    assert torch.equal(loaded.predict(x), adapter.predict(x))
    assert (loaded.name, loaded.categories, loaded.concepts, loaded.scale_range) == ("beach", ("object",), ("beach",), (1.0, 9.0))
    assert loaded.fingerprint == sd_fingerprint and loaded.training == {"prompts": 3}
    meta = json.loads(read_header(path).meta and json.dumps(read_header(path).meta))
    assert meta["format_version"] == 1 and meta["fingerprint"]["layer_count"] == 16


def test_fingerprint_from_another_model_is_a_clear_error(tmp_path, sd_fingerprint, sdxl_pipe, sd_pipe):
    path = save_adapter(make_adapter(sd_fingerprint), tmp_path / "beach.safetensors")
    load_adapter(path, pipeline=sd_pipe)  # its own model: fine
    with pytest.raises(AdapterError, match="trained for another model: 16 cross-attention layers in the adapter, 12 in the pipeline") as err:
        load_adapter(path, pipeline=sdxl_pipe)
    assert err.value.file == str(path)
    # same layer names, other text width (SD 1.x vs SD 2.x): still refused
    wider = Fingerprint(sd_fingerprint.layer_names, (1024,) * 16)
    with pytest.raises(AdapterError, match="reads 32-wide text embeddings in the adapter but 1024-wide"):
        load_adapter(path, fingerprint=wider)


def test_wrong_feature_length_is_a_clear_error(sd_fingerprint):
    adapter = make_adapter(sd_fingerprint)
    with pytest.raises(AdapterError, match=r"expects 16 features per token \(one per cross-attention layer\), got shape \(2, 7\)"):
        adapter.predict(torch.zeros(2, 7))


@pytest.mark.parametrize("use_zip", [True, False])
def test_pickled_pt_file_is_refused_without_unpickling(tmp_path, monkeypatch, sd_fingerprint, use_zip):
    adapter = make_adapter(sd_fingerprint)
    path = tmp_path / "adapter.pt"
    torch.save(adapter.model.state_dict(), path, _use_new_zipfile_serialization=use_zip)

    def no_unpickling(*a, **k):
        raise AssertionError("an adapter file was unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(path.read_bytes())
    for candidate in (path, disguised):
        with pytest.raises(AdapterError, match="pickled PyTorch file .* never unpickles"):
            load_adapter(candidate)


def test_not_an_adapter(tmp_path, sd_fingerprint):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not tensors")
    with pytest.raises(AdapterError, match="not a safetensors file"):
        load_adapter(junk)
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, str(bare))
    with pytest.raises(AdapterError, match="without gie_guard adapter metadata"):
        load_adapter(bare)
    with pytest.raises(AdapterError, match="no such file|cannot read"):
        load_adapter(tmp_path / "missing.safetensors")


def _rewrite(path, tensors=None, meta=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        old_meta = json.loads(f.metadata()[METADATA_KEY])
        old = {k: f.get_tensor(k) for k in f.keys()}
    old.update(tensors or {})
    old_meta.update(meta or {})
    save_file(old, str(path), metadata={METADATA_KEY: json.dumps(old_meta)})


def test_shape_mismatch_and_bad_metadata(tmp_path, sd_fingerprint):
    path = save_adapter(make_adapter(sd_fingerprint), tmp_path / "a.safetensors")
    _rewrite(path, tensors={"net.0.weight": torch.zeros(64, 12)})
    with pytest.raises(AdapterError, match=r"net.0.weight has shape \(64, 12\), expected \(64, 16\) for 16 cross-attention layers"):
        load_adapter(path)
    path = save_adapter(make_adapter(sd_fingerprint), tmp_path / "b.safetensors")
    _rewrite(path, meta={"format_version": 99})
    with pytest.raises(AdapterError, match="format version 99 is not supported"):
        load_adapter(path)
    path = save_adapter(make_adapter(sd_fingerprint), tmp_path / "c.safetensors")
    _rewrite(path, tensors={"net.4.bias": torch.tensor([float("nan")])})
    with pytest.raises(AdapterError, match="net.4.bias must hold finite"):
        load_adapter(path)


def test_non_finite_rule():
    raw = torch.tensor([float("nan"), float("inf"), float("-inf"), 3.0, 100.0, -5.0])
    scales, nonfinite = resolve_scales(raw, lo=1.0, hi=10.0, fallback=4.0)
    assert nonfinite and scales.tolist() == [4.0, 10.0, 1.0, 3.0, 10.0, 1.0]
    scales, nonfinite = resolve_scales(torch.tensor([2.0]), lo=1.0, hi=10.0, fallback=4.0)
    assert not nonfinite and scales.tolist() == [2.0]
