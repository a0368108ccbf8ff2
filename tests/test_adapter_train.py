"""`gie-guard adapter train` end to end on the tiny pipeline, and the labelling rule."""

import json
import pathlib

import numpy as np
import pytest

from gie_guard import Guard
from gie_guard.adapters import Fingerprint, load_adapter
from gie_guard.adapters.judges import NudeNetJudge, PixelSimilarity, load_judge
from gie_guard.adapters.training import choose_label
from gie_guard.cli import main


class BrightJudge:
    """Trivial but real: the concept is "present" while the image is brighter than the
    unguarded images of the tiny pipeline tend to be (it looks at pixels, nothing else)."""

    def __call__(self, images, concept):
        return [bool(im.mean() > 127.6) for im in images]


GRID = (1.0, 4.0, 16.0)


@pytest.mark.parametrize(
    "present_unguarded, present, kept, expected",
    [
        (False, [True, True, True], [1, 1, 1], (1.0, "absent")),
        (True, [True, False, False], [1, 1, 1], (4.0, "erased")),
        (True, [True, False, False], [1, 0.5, 1], (16.0, "erased")),  # 4 erases but breaks the image
        (True, [True, True, False], [1, 0.9, 0.1], (4.0, "survives")),  # most erasure that stays intact
        (True, [True, True, True], [0.1, 0.1, 0.1], (1.0, "broken")),
    ],
)
def test_labelling_rule(present_unguarded, present, kept, expected):
    assert choose_label(GRID, present_unguarded, present, kept, 0.75) == expected


def test_adapter_train_cli_end_to_end(tmp_path, monkeypatch, capsys, sd_pipe):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))  # for --judge test_adapter_train:...
    (tmp_path / "prompts.txt").write_text("# beaches\na photo of a beach\na beach at night\n\na sunny beach\n")
    out = tmp_path / "adapters" / "tiny-beach.safetensors"
    code = main([
        "adapter", "train", "--pipeline", "tiny", "--prompts", str(tmp_path / "prompts.txt"), "--concept", "beach",
        "--scales", "16,1,4", "--judge", "test_adapter_train:BrightJudge", "--preservation", "pixel",
        "--preserve-bound", "0.8", "--steps", "2", "--epochs", "300", "--out", str(out), "--no-progress",
    ])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"wrote {out}" in printed.out
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["prompts"]
    assert [r["prompt"] for r in rows] == ["a photo of a beach", "a beach at night", "a sunny beach"]
    for r in rows:  # every label follows the documented rule from what was judged
        assert len(r["present"]) == len(r["preservation"]) == 3 and len(r["features"][0]) == 16
        assert (r["label"], r["rule"]) == choose_label(GRID, r["present_unguarded"], r["present"], r["preservation"], 0.8)
    assert report["summary"]["scale_grid"] == [1.0, 4.0, 16.0]
    assert sum(report["summary"]["label_rules"].values()) == 3

    adapter = load_adapter(out, pipeline=sd_pipe)
    assert adapter.categories == ("object",) and adapter.concepts == ("beach",) and adapter.scale_range == (1.0, 16.0)
    assert adapter.fingerprint == Fingerprint.of_pipeline(sd_pipe)
    # the folder it was written to serves `scale: auto` concepts
    guard = Guard(policy={"name": "p", "concepts": [{"id": "beach", "text": "beach", "category": "object", "scale": "auto"}]},
                  adapters=[out.parent])
    guard(sd_pipe, prompt="a photo of a beach", num_inference_steps=2, output_type="np")
    assert guard.last_report.concepts[0].adapter == adapter.label

    assert main(["adapter", "inspect", str(out)]) == 0
    assert "16 cross-attention layers" in capsys.readouterr().out


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    pt = tmp_path / "x.pt"
    pt.write_bytes(b"\x80\x04K\x01.")  # a pickle
    assert main(["adapter", "inspect", str(pt)]) == 1
    assert "never unpickles" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a\nb\n")
    assert main(["adapter", "train", "--pipeline", "tiny", "--prompts", str(tmp_path / "p.txt"), "--concept", "x",
                 "--scales", "1,1", "--judge", "nudenet", "--out", str(tmp_path / "a.safetensors")]) == 1
    assert "distinct" in capsys.readouterr().err


def test_judges_load_and_answer(monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))
    images = np.full((2, 32, 32, 3), 230, np.uint8)
    assert NudeNetJudge()(images, "nudity") == [False, False]
    assert PixelSimilarity()(images, images, "x") == [1.0, 1.0]
    assert isinstance(load_judge("test_adapter_train:BrightJudge"), BrightJudge)


def test_shapes_judge_and_preservation():
    from gie_guard.shapes.detector import WEIGHTS

    if not WEIGHTS.exists():
        pytest.skip(f"shapes-world detector weights not trained yet ({WEIGHTS} is missing)")
    from gie_guard.adapters.judges import ShapesJudge, ShapesPreservation
    from gie_guard.shapes.world import Scene, Thing, render

    rng = np.random.default_rng(0)
    red_circle = render(Scene((Thing("circle", "red", "plain"),)), rng)[None]
    red_square = render(Scene((Thing("square", "red", "plain"),)), rng)[None]
    blue_circle = render(Scene((Thing("circle", "blue", "plain"),)), rng)[None]
    judge = ShapesJudge()
    assert judge(red_circle, "circle") == [True] and judge(red_circle, "disc") == [True]
    assert judge(red_square, "circle") == [False]
    keep = ShapesPreservation(judge.detector)
    assert keep(red_circle, red_square, "circle") == [1.0]  # colour and style kept, still a shape
    assert keep(red_circle, blue_circle, "circle")[0] < 1.0
