"""Selecting adapters for `scale: auto` concepts, and using them in guarded calls."""

import numpy as np
import pytest
import torch

from gie_guard import Guard, PolicyError
from gie_guard.adapters import AdapterLibrary, Fingerprint, MLPAdapter, ScaleMLP, measure_features, save_adapter

from test_adapter_format import make_adapter


def policy(category="object", *, window=(0.0, 1.0), missing="fallback", auto=None):
    scale = auto or {"auto": True, "fallback": 3.0, "min": 0.0, "max": 50.0}
    return {
        "name": "auto",
        "inhibit_steps": list(window),
        "on_missing_adapter": missing,
        "concepts": [{"id": "beach", "text": "beach", "category": category, "scale": scale}],
    }


def run(pipe, guard, *, seed=0, steps=2, **kw):
    call = dict(prompt="a photo of a beach", num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np")
    call.update(kw)
    return guard(pipe, **call).images


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sd_pipe, sdxl_pipe):
    """object + style adapters for the tiny SD pipeline, an object adapter for tiny SDXL."""
    root = tmp_path_factory.mktemp("adapters")
    sd = Fingerprint.of_pipeline(sd_pipe)
    save_adapter(make_adapter(sd, name="sd-object", concepts=("car",), seed=1), root / "sd-object.safetensors")
    save_adapter(make_adapter(sd, name="sd-style", categories=("style",), concepts=("Van Gogh",), seed=2), root / "sd-style.safetensors")
    save_adapter(make_adapter(Fingerprint.of_pipeline(sdxl_pipe), name="xl-object", seed=3), root / "xl-object.safetensors")
    return root


def test_selection_by_fingerprint_and_category(folder, sd_pipe, sdxl_pipe):
    library = AdapterLibrary([folder])
    sd, xl = Fingerprint.of_pipeline(sd_pipe), Fingerprint.of_pipeline(sdxl_pipe)
    assert library.select(sd, "object").name == "sd-object"
    assert library.select(sd, "style").name == "sd-style"
    assert library.select(xl, "object").name == "xl-object"
    assert library.select(xl, "style") is None
    assert library.select(sd, "nsfw") is None
    assert AdapterLibrary(str(folder)).select(sd, "object").name == "sd-object"  # one folder, not its characters


def test_an_adapter_trained_on_the_concept_comes_first(folder, sd_pipe):
    sd = Fingerprint.of_pipeline(sd_pipe)
    own = make_adapter(sd, name="beach-own", concepts=("beach",), seed=4)
    library = AdapterLibrary([folder, own])  # named later, but trained on the text
    assert library.select(sd, "object", "beach") is own
    assert library.select(sd, "object", "tree").name == "sd-object"


def test_a_named_folder_that_does_not_exist_fails_closed(tmp_path, sd_pipe):
    with pytest.raises(Exception, match="no such adapter file or folder"):
        AdapterLibrary([tmp_path / "nope"]).select(Fingerprint.of_pipeline(sd_pipe), "object")


def test_report_shows_the_adapter_and_its_prediction(folder, sd_pipe):
    guard = Guard(policy=policy(), adapters=[folder])
    run(sd_pipe, guard)
    applied = guard.last_report.concepts[0]
    adapter = AdapterLibrary([folder]).select(Fingerprint.of_pipeline(sd_pipe), "object")
    assert applied.scale_source == "adapter" and applied.adapter == adapter.label
    assert applied.adapter.startswith("sd-object@")
    assert guard.last_report.feature_pass == "probe" and guard.last_report.scale_inference_seconds > 0
    # the scale is the adapter's prediction on the unsuppressed first-step features
    _, features = measure_features(sd_pipe, "beach", prompt="a photo of a beach", num_inference_steps=2,
                                   generator=torch.Generator().manual_seed(0), output_type="np")
    expected = adapter.predict(features).clamp(1.0, 9.0)
    assert applied.token_scales == pytest.approx(expected.tolist(), rel=1e-4)
    # the compiled plan keeps its placeholder: per-call scales never leak into the cache
    plan = guard.plan_for(sd_pipe)
    assert float(plan.token_scales[0, applied.token_positions[0]]) == 50.0


def test_probe_pass_gives_the_fixed_scale_image(folder, sd_pipe):
    """With the probe, the call is the fixed-scale call at the predicted scale: the probe
    leaves no trace in the latents."""
    guard = Guard(policy=policy(), adapters=[folder], feature_pass="probe")
    auto = run(sd_pipe, guard)
    scale = guard.last_report.concepts[0].token_scales[0]
    fixed = Guard(policy={**policy(), "concepts": [{"id": "beach", "text": "beach", "scale": scale}]})
    assert np.allclose(run(sd_pipe, fixed), auto, atol=1e-5)
    assert guard.last_report.steps_inhibited == (0, 1)


def test_reuse_pass_applies_from_step_one(folder, sd_pipe):
    guard = Guard(policy=policy(), adapters=[folder], feature_pass="reuse")
    run(sd_pipe, guard)
    report = guard.last_report
    assert report.feature_pass == "reuse" and report.concepts[0].adapter.startswith("sd-object@")
    # a window that starts after step 0: "auto" reuses step 0 for free
    guard = Guard(policy=policy(window=(0.5, 1.0)), adapters=[folder])
    run(sd_pipe, guard)
    assert guard.last_report.feature_pass == "reuse"


def test_no_adapter_for_the_category_uses_the_fallback_or_fails(folder, sd_pipe):
    guard = Guard(policy=policy("nsfw"), adapters=[folder])
    run(sd_pipe, guard)
    applied = guard.last_report.concepts[0]
    assert (applied.scale_source, applied.adapter, applied.token_scales) == ("fallback", None, (3.0,))
    with pytest.raises(PolicyError, match="no adapter for category 'nsfw' fits this pipeline"):
        run(sd_pipe, Guard(policy=policy("nsfw", missing="error"), adapters=[folder]))


def test_policy_range_clamps_and_non_finite_prediction_uses_the_fallback(sd_pipe):
    sd = Fingerprint.of_pipeline(sd_pipe)
    high = make_adapter(sd, name="high", scale_range=(0.0, 100.0))
    with torch.no_grad():
        high.model.net[4].bias.fill_(10.0)  # predicts about 1,000
    guard = Guard(policy=policy(auto={"auto": True, "fallback": 3.0, "min": 1.0, "max": 7.5}), adapters=[high], feature_pass="probe")
    run(sd_pipe, guard)
    assert guard.last_report.concepts[0].token_scales == (7.5,)

    broken = make_adapter(sd, name="nan")
    with torch.no_grad():
        broken.model.net[4].bias.fill_(float("nan"))
    guard = Guard(policy=policy(), adapters=[broken], feature_pass="probe")
    run(sd_pipe, guard)
    applied = guard.last_report.concepts[0]
    assert applied.scale_source == "adapter:nonfinite-rule" and applied.token_scales == (3.0,)


def test_sdxl_probe_slices_the_added_conditioning(sdxl_pipe):
    adapter = make_adapter(Fingerprint.of_pipeline(sdxl_pipe), name="xl", scale_range=(2.0, 4.0))
    guard = Guard(policy=policy(), adapters=[adapter], feature_pass="probe")
    run(sdxl_pipe, guard, steps=2)
    assert guard.last_report.concepts[0].adapter.startswith("xl@")
    assert 2.0 <= guard.last_report.concepts[0].token_scales[0] <= 4.0


def test_unknown_feature_pass_is_refused_at_construction():
    from gie_guard import GuardError

    with pytest.raises(GuardError, match="feature_pass must be one of auto, probe, reuse"):
        Guard(policy=policy(), feature_pass="sometimes")


def test_shipped_shapes_adapter_serves_the_shapes_model_only(sd_pipe):
    from gie_guard.shapes.model import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "unet.safetensors").exists():
        pytest.skip("shapes-world weights not trained yet")
    from gie_guard.shapes import load_pipeline

    shapes = load_pipeline()
    library = AdapterLibrary()  # the shipped ones only
    assert "shapes-circle" in library.available()
    assert library.select(Fingerprint.of_pipeline(sd_pipe), "object") is None  # same layer names, other width
    guard = Guard(policy={"name": "p", "concepts": [{"id": "circle", "text": "circle", "category": "object", "scale": "auto"}]})
    guard(shapes, prompt="a red circle", num_inference_steps=2, output_type="np")
    applied = guard.last_report.concepts[0]
    assert applied.adapter.startswith("shapes-circle@") and 0.25 <= applied.token_scales[0] <= 3.0
