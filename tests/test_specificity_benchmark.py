"""benchmarks/specificity.py: its --smoke run on the real two-cell shapes UNet and detector
(a subprocess, offline), and the pure measurement helpers it is built on."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from gie_guard.shapes import specificity as S

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "specificity.py"
MEASURES = ("target_removal", "other_kept", "null_kept", "sibling_removal", "pair_target_removal", "other_shown_anywhere",
            "other_shown_in_place", "null_attributes_kept")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("specificity")
    done = _run("--backbone", "unet", "--target", "circle", "--other", "square", "--seeds", "0:2", "--out", str(out),
                "--smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_smoke_writes_one_row_per_method_with_the_schema(smoke: pathlib.Path) -> None:
    rows = json.loads((smoke / "results.json").read_text())
    assert [r["method"] for r in rows] == ["default", "negative-prompt"]
    for r in rows:
        assert r["status"] == "ran"
        assert (r["backbone"], r["target"], r["other"], r["n"]) == ("unet", "circle", "square", 2)
        assert r["target_words"] == {"attribute": "circle", "synonyms": [], "held_out": []}
        assert r["sibling_words"] == ["square"]
        for key in MEASURES:
            value = r[key]
            assert value is None or 0.0 <= value <= 1.0, (r["method"], key, value)
        for key in ("target_removal_n", "other_kept_n", "null_n", "pair_target_removal_n"):
            assert 0 <= r[key] <= r["n"], (key, r[key])
        assert r["null_n"] == 2
        assert set(r["meets"]) == {"target_removal", "other_kept", "null_kept", "sibling_removal"}
        assert r["sibling_worst_word"] in (None, "square")
    default = rows[0]
    assert (default["scale"], default["window"]) == (2.0, [0.0, 1.0])  # the UNet erasure benchmark's circle
    # measured on these seeds at 4 steps: both unguarded images draw a circle and the guard
    # removes it from both; a guard that stopped erasing would fail here
    assert default["target_removal_n"] == 2 and default["target_removal"] > 0
    assert rows[1]["scale"] is None  # the negative prompt has no scale


def test_smoke_writes_the_markdown_table(smoke: pathlib.Path) -> None:
    md = (smoke / "results.md").read_text()
    assert "| method | target removal | other kept | null kept | sibling removal (worst word) |" in md
    assert "| method | other shown anywhere | other shown in place | null attributes kept |" in md
    # the main, diagnostics and per-word tables
    assert md.count("\n| default |") == 3 and md.count("\n| negative-prompt |") == 3
    assert "held-out synonyms: none" in md and "--smoke" in md


def test_unknown_method_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    done = _run("--backbone", "unet", "--target", "circle", "--other", "square", "--out", str(tmp_path),
                "--method", "gie-calibrated", "--smoke")
    assert done.returncode == 2
    assert "unknown method(s) gie-calibrated" in done.stderr and "anchors-project" in done.stderr
    assert not (tmp_path / "results.json").exists()


def test_a_method_that_does_not_apply_is_skipped_with_a_note(tmp_path: pathlib.Path) -> None:
    done = _run("--backbone", "unet", "--target", "red", "--other", "blue", "--out", str(tmp_path), "--smoke",
                "--method", "gie-image-sink")
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "results.json").read_text())
    assert row["status"] == "skipped" and "dit" in row["note"]
    assert "`gie-image-sink` skipped: applies to dit only" in (tmp_path / "results.md").read_text()


# -- the helpers, on hand-written detector answers ---------------------------------------------

RED_CIRCLE = {"red", "circle", "plain"}
BLUE_SQUARE = {"blue", "square", "plain"}


def test_removal_counts_only_seeds_whose_unguarded_image_shows_the_attribute() -> None:
    before = [{"left": RED_CIRCLE, "right": set()}, {"left": set(), "right": BLUE_SQUARE},
              {"left": set(), "right": RED_CIRCLE}]
    after = [{"left": set(), "right": {"red", "square", "plain"}}, {"left": set(), "right": RED_CIRCLE},
             {"left": RED_CIRCLE, "right": set()}]  # the circle moved cells: still shown
    assert S.removal(before, after, "circle") == (0.5, 2)
    assert math.isnan(S.removal(before[1:2], after[1:2], "circle")[0])


def test_other_kept_wants_the_same_cell_and_every_attribute() -> None:
    square = {"shape": "square", "colour": "blue", "style": "plain"}
    before = [{"left": RED_CIRCLE, "right": BLUE_SQUARE}] * 3 + [{"left": RED_CIRCLE, "right": set()}]
    after = [{"left": set(), "right": BLUE_SQUARE},              # kept
             {"left": BLUE_SQUARE, "right": set()},              # moved
             {"left": set(), "right": {"blue", "square", "dotted"}},  # restyled
             {"left": set(), "right": set()}]                    # no square unguarded: not counted
    assert S.other_kept(before, after, [square] * 4, "square", "circle") == (1 / 3, 3)
    # looser: the square is still drawn in all three, in its own cell in two
    assert S.other_survives(before, after, [square] * 4, "square", "circle") == ((1.0, 3), (2 / 3, 3))


def test_all_kept_and_prompts() -> None:
    cells = [{"left": RED_CIRCLE, "right": set()}, {"left": RED_CIRCLE, "right": BLUE_SQUARE}]
    assert S.all_kept(cells, [cells[0], {"left": RED_CIRCLE, "right": set()}]) == (0.5, 2)
    assert S.attributes_kept(cells, [cells[0], {"left": RED_CIRCLE, "right": set()}]) == 6 / 9
    assert S.siblings("circle") == ("square", "triangle", "star", "cross")
    assert S.Words.of("circle").all() == ("circle", "disc", "disk")
    assert S.single_prompt("disk", "circle", 3).endswith(" disk")
    for seed in range(20):
        a, b = S.pair_things("red", "blue", seed)
        assert a["colour"] == "red" and b["colour"] == "blue"
        text = S.pair_prompt("circle", "square", seed)
        assert " and " in text and "circle" in text and "square" in text and "left" not in text
        placed = S.pair_prompt("circle", "square", seed, placed=True)
        first, second = placed.split(" and ")
        assert placed.startswith(text.split(" and ")[0] + " on the ")  # the same things, in the same order
        assert {first.rsplit(" ", 1)[1], second.rsplit(" ", 1)[1]} == {"left", "right"}
    sides = {S.pair_prompt("circle", "square", seed, placed=True).split(" on the ")[1][:4] for seed in range(20)}
    assert sides == {"left", "righ"}  # the first-named thing goes either way across seeds
    with pytest.raises(ValueError):
        S.kind_of("table")


@pytest.mark.parametrize(("target", "other"), [("circle", "square"), ("red", "blue"), ("striped", "dotted")])
def test_placed_pair_without_the_target_word(target: str, other: str) -> None:
    words = set(S.Words.of(target).all())
    for seed in range(20):
        named = S.placed_pair(target, other, seed)
        assert named == S.pair_prompt(target, other, seed, placed=True)
        unnamed = S.placed_pair(target, other, seed, name_target=False)
        assert not words & set(unnamed.split()), unnamed
        assert "  " not in unnamed and unnamed.startswith("a ")
        # only the target's thing changed: the other thing's phrase and both places are as named
        thing, other_thing = S.pair_things(target, other, seed)
        assert S.phrase(other_thing) in unnamed
        for part_named, part_unnamed in zip(named.split(" and "), unnamed.split(" and ")):
            assert part_named.rsplit(" ", 1)[1] == part_unnamed.rsplit(" ", 1)[1]  # the same place words
    assert S.unnamed_phrase({"shape": "circle", "colour": "red", "style": "plain"}, "shape") == "a red thing"
    assert S.unnamed_phrase({"shape": "circle", "colour": "red", "style": "dotted"}, "colour") == "a dotted circle"
    assert S.unnamed_phrase({"shape": "circle", "colour": "red", "style": "striped"}, "style") == "a red circle"


def test_placed_scene_names_two_different_things_and_both_places() -> None:
    scenes = [S.placed_scene(seed) for seed in range(40)]
    for text in scenes:
        first, second = text.split(" and ")
        assert {first.rsplit(" ", 1)[1], second.rsplit(" ", 1)[1]} == {"left", "right"}
        assert first.split(" on the ")[0] != second.split(" on the ")[0]
    assert len(set(scenes)) > 30  # drawn per seed
