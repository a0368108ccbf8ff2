"""explain: per-step concept attention maps, unguarded and guarded, and the PNG."""

import numpy as np
import pytest
import torch
from PIL import Image

from gie_guard import ConceptError, Guard
from gie_guard.cli import main
from gie_guard.explain import concept_recorder, explain


def test_recorded_maps_match_the_engine_and_the_guard_changes_them(sd_pipe):
    guard = Guard(policy={"name": "p", "inhibit_steps": [0.0, 1.0],
                          "concepts": [{"id": "beach", "text": "beach", "scale": 8.0}]})
    call = dict(prompt="a beach", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    with concept_recorder(sd_pipe, guard, "beach") as recorder:
        guard(sd_pipe, **call)
    # at step 0 the recorder measures exactly what the engine reports per layer
    means = recorder.layer_means(0)
    in_engine_order = [means[name.removesuffix(".processor")] for name in guard.plan_for(sd_pipe).layer_names]
    np.testing.assert_allclose(in_engine_order, guard.last_report.concepts[0].attention_per_layer, rtol=1e-4)
    maps = recorder.stacked(None)
    assert maps.shape == (2, 8, 8) and np.all((maps > 0) & (maps < 1))

    result = explain(sd_pipe, guard, "a beach", steps=2, columns=8, output_type="np")
    assert result.concept_id == "beach" and result.scale == 8.0
    assert result.maps_before.shape == result.maps_after.shape == (2, 8, 8)
    np.testing.assert_allclose(result.maps_after, maps, rtol=1e-5)  # the guarded run, recorded again
    assert np.abs(result.maps_after[1:] - result.maps_before[1:]).max() > 1e-6  # inhibition changed later steps
    # one row per run, the image plus one tile per step
    assert result.figure.size[0] > 3 * 96 and result.figure.size[1] > 2 * 96
    with pytest.raises(ConceptError, match="'sunset'.*concepts: beach"):
        explain(sd_pipe, guard, "a beach", concept="sunset", steps=1)


def test_cli_writes_the_png(tmp_path, capsys):
    out = tmp_path / "explain.png"
    status = main(["explain", "--prompt", "a red circle", "--policy", "shapes-demo", "--pipeline", "tiny",
                   "--steps", "1", "--columns", "1", "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 2 * 96
    printed = capsys.readouterr().out
    assert "concept 'circle'" in printed and str(out) in printed
    assert main(["explain", "--prompt", "x", "--policy", "no-such-policy", "--pipeline", "tiny"]) == 1
