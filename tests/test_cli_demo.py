"""`gie-guard demo`: a labelled, enlarged picture, and a clean terminal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from gie_guard.demo import labelled_pair

ROOT = Path(__file__).resolve().parents[1]


def test_labelled_pair_enlarges_with_nearest_and_labels_both_images():
    rng = np.random.default_rng(0)
    before, after = (Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2))
    picture = labelled_pair(before, after, captions=["policy shapes-demo: circle (scale 1.5)", "prompt 'a red circle'"], zoom=8)
    pad, title, gap = 8, 26, 8
    assert picture.size == (2 * 256 + gap + 2 * pad, pad + title + 256 + pad + 2 * 18 + pad)
    array = np.asarray(picture)
    left = array[pad + title: pad + title + 256, pad: pad + 256]
    right = array[pad + title: pad + title + 256, pad + 256 + gap: pad + 2 * 256 + gap]
    np.testing.assert_array_equal(left, np.asarray(before.resize((256, 256), Image.NEAREST)))
    np.testing.assert_array_equal(right, np.asarray(after.resize((256, 256), Image.NEAREST)))
    # titles above each image and captions below are drawn (dark text on white)
    assert (array[:pad + title, pad: pad + 256] < 100).any() and (array[:pad + title, -pad - 256:-pad] < 100).any()
    assert (array[pad + title + 256 + pad:] < 100).any()


def test_demo_writes_the_labelled_picture_and_keeps_stderr_clean(tmp_path):
    """No transformers torchvision warnings, no loading bars, no prompt-text warnings."""
    out = tmp_path / "demo.png"
    done = subprocess.run(
        [sys.executable, "-m", "gie_guard.cli", "demo", "--pipeline", "shapes", "--steps", "4", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""  # today: "[transformers] `CLIPImageProcessor` requires torchvision ..." and a progress bar
    assert f"wrote {out}" in done.stdout and "detector, unguarded:" in done.stdout
    with Image.open(out) as picture:
        assert picture.size[0] == 2 * 32 * 8 + 8 + 16 and picture.size[1] > 32 * 8 + 26


def test_demo_on_the_transformer_shapes_model(tmp_path):
    """--backbone dit: the same picture from the SD3-family shapes model, a clean terminal."""
    out = tmp_path / "demo-dit.png"
    done = subprocess.run(
        [sys.executable, "-m", "gie_guard.cli", "demo", "--pipeline", "shapes", "--backbone", "dit", "--steps", "3",
         "--zoom", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
    assert "transformer (SD3-family) shapes-world model" in done.stdout
    assert f"wrote {out}" in done.stdout and "detector, guarded:" in done.stdout
    # shapes-demo runs at the transformer's measured setting: scale 2 over every step
    assert "policy: shapes-demo-dit" in done.stdout and "scales (2.0,)" in done.stdout
    assert "steps inhibited: 3 of 3" in done.stdout
    with Image.open(out) as picture:
        assert picture.size[0] == 2 * 32 * 2 + 8 + 16


def test_backbone_option_and_its_errors(capsys):
    from gie_guard.cli import build_parser, main

    assert build_parser().parse_args(["demo"]).backbone == "unet"
    assert build_parser().parse_args(["demo", "--backbone", "dit"]).backbone == "dit"
    assert build_parser().parse_args(["explain", "--prompt", "x", "--backbone", "dit"]).backbone == "dit"
    assert main(["demo", "--backbone", "flux"]) == 2  # argparse: not a choice
    capsys.readouterr()
    # dit chooses a shapes-world model: with any other pipeline it is an error, before loading
    assert main(["demo", "--pipeline", "tiny", "--backbone", "dit"]) == 1
    assert "--backbone dit chooses a shapes-world model" in capsys.readouterr().err


def test_pipeline_kind_by_backbone(tmp_path):
    import pytest

    from gie_guard.cli.pipelines import pipeline_kind
    from gie_guard.errors import ConfigurationError

    assert pipeline_kind("auto", None, "dit") == "shapes"  # the packaged transformer weights
    (tmp_path / "unet.safetensors").write_bytes(b"")
    assert pipeline_kind("auto", str(tmp_path), "unet") == "shapes"
    with pytest.raises(ConfigurationError, match="no transformer shapes weights"):
        pipeline_kind("auto", str(tmp_path), "dit")  # a UNet-only folder
    with pytest.raises(ConfigurationError, match="missing dit_model.json, dit_transformer.safetensors"):
        from gie_guard.cli.pipelines import load_pipeline

        load_pipeline("shapes", weights=str(tmp_path), backbone="dit")
