"""explain on the transformer (SD3-family) shapes model: the engine's observers record the
joint-attention maps of every block, --sites picks blocks, the CLI's --backbone dit."""

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry

from gie_guard import ConfigurationError, Guard
from gie_guard.cli import main
from gie_guard.explain import concept_recorder, explain
from gie_guard.metrics import GuardMetrics
from gie_guard.shapes import load_pipeline

BLOCKS = [f"transformer_blocks.{i}.attn" for i in range(6)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: two threads spin-wait on each other
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline(backbone="dit")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def guard():
    return Guard(policy={"name": "circle", "inhibit_steps": [0.0, 1.0],
                         "concepts": [{"id": "circle", "text": "circle", "scale": 1.5}]},
                 metrics=GuardMetrics(CollectorRegistry()))


def test_every_joint_block_is_recorded_and_step_zero_matches_the_engine(pipe, guard):
    call = dict(prompt="a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    with concept_recorder(pipe, guard, "circle") as recorder:
        guard(pipe, **call)
    assert recorder.site_names() == BLOCKS
    means = recorder.layer_means(0)
    in_engine_order = [means[name.removesuffix(".processor")] for name in guard.plan_for(pipe).layer_names]
    np.testing.assert_allclose(in_engine_order, guard.last_report.concepts[0].attention_per_layer, rtol=1e-4)
    every = recorder.stacked()
    assert every.shape == (2, 8, 8) and np.all((every > 0) & (every < 1))  # 64 image tokens, 8 x 8
    # a prefix picks a block; several blocks are averaged
    one = recorder.stacked(sites=["transformer_blocks.1"])
    np.testing.assert_allclose(one[0].ravel(), recorder.maps[0][BLOCKS[1]].numpy(), rtol=1e-6)
    two = recorder.stacked(sites=["transformer_blocks.1", "transformer_blocks.2.attn"])
    np.testing.assert_allclose(two[1].ravel(), (recorder.maps[1][BLOCKS[1]] + recorder.maps[1][BLOCKS[2]]).numpy() / 2,
                               rtol=1e-5)
    with pytest.raises(ConfigurationError, match=r"'transformer_blocks\.9'.*sites: transformer_blocks\.0\.attn"):
        recorder.stacked(sites=["transformer_blocks.9"])


def test_explain_draws_the_transformer_and_the_guard_changes_its_maps(pipe, guard):
    result = explain(pipe, guard, "a red circle", steps=3, columns=3, sites=["transformer_blocks.0", "transformer_blocks.1"])
    assert result.maps_before.shape == result.maps_after.shape == (3, 8, 8)
    assert np.abs(result.maps_after[1:] - result.maps_before[1:]).max() > 1e-6  # inhibition changed later steps
    assert result.figure.size[0] > 4 * 96


def test_cli_explain_with_the_dit_backbone(tmp_path, capsys):
    out = tmp_path / "explain-dit.png"
    status = main(["explain", "--prompt", "a red circle", "--pipeline", "shapes", "--backbone", "dit", "--steps", "2",
                   "--columns", "2", "--sites", "transformer_blocks.1", "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "transformer (SD3-family) shapes-world model" in printed and "concept 'circle' (scale 2)" in printed
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 3 * 96
    assert main(["explain", "--prompt", "x", "--pipeline", "shapes", "--backbone", "dit", "--steps", "1",
                 "--sites", "down_blocks.0", "--out", str(out)]) == 1
    assert "no attention site named 'down_blocks.0'" in capsys.readouterr().err
