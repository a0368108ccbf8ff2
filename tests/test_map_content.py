"""benchmarks/map_content.py: the per-word measures on synthetic maps (exact values), and its
--smoke run on the real two-cell shapes UNet and detector (a subprocess, offline)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "map_content.py"


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("map_content", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))  # as when run as a script: benchmarks/_common.py importable
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_word_rows_compare_the_words_cells_with_its_siblings_cells() -> None:
    mc = _module()
    words = ("circle", "square", "red", "zqxv")
    # 2 sites, 3 images, 4 words, 2 heads, 2 cells (left, right)
    labels = [[{"circle", "red", "plain"}, {"square", "blue", "plain"}],
              [{"square", "red", "plain"}, set()],
              [set(), {"circle", "green", "dotted"}]]
    maps = np.full((2, 3, 4, 2, 2), 0.1)
    maps[:, 0, 0, :, 0] = 0.3  # circle's map on the circle cells: 3x its map on the squares' cells
    maps[:, 2, 0, :, 1] = 0.3
    maps[1, :, 1, 1, :] = 0.2  # square's map: head 1 of site 1 is twice as large everywhere: no content
    maps[:, :, 3] = 0.5  # zqxv
    rows = {r["word"]: r for r in mc.word_rows(maps, labels, words)}
    circle = rows["circle"]
    assert (circle["n_own"], circle["n_sibling"]) == (2, 2)
    assert circle["own"] == pytest.approx(0.3) and circle["sibling"] == pytest.approx(0.1)
    assert circle["ratio"] == pytest.approx(3.0) and circle["heads_over_2"] == 1.0
    square = rows["square"]
    assert square["ratio"] == pytest.approx(1.0) and square["heads_over_2"] == 0.0
    red = rows["red"]  # red's siblings (green, blue, ...) are on 2 cells, red on 2
    assert (red["n_own"], red["n_sibling"]) == (2, 2) and red["ratio"] == pytest.approx(1.0)
    null = rows["zqxv"]
    assert null["kind"] == "null" and null["mean"] == pytest.approx(0.5)
    owns = [circle["own"], square["own"], red["own"]]
    assert null["over_targets"] == pytest.approx(0.5 / np.mean(owns))


def test_a_word_never_drawn_has_no_ratio() -> None:
    mc = _module()
    rows = mc.word_rows(np.full((1, 1, 1, 1, 2), 0.1), [[{"circle"}, set()]], ("star",))
    assert rows == [{"word": "star", "kind": "shape", "n_own": 0, "n_sibling": 1}]


def test_smoke_run_on_the_two_cell_unet(tmp_path: pathlib.Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--backbone", "unet", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads((tmp_path / "results.json").read_text())
    assert (result["backbone"], result["sink"], result["images"], result["step"]) == ("unet", "own", 4, 2)
    assert len(result["sites"]) == 16  # the UNet's cross-attention layers
    rows = {r["word"]: r for r in result["words"]}
    assert set(rows) == {*mc_words(), "zqxv"}
    cells = 2 * result["images"]
    for word, r in rows.items():
        if word == "zqxv":
            assert 0.0 < r["mean"] < 1.0
            continue
        assert 0 <= r["n_own"] + r["n_sibling"] <= cells
        if "own" in r:
            assert 0.0 < r["own"] < 1.0 and 0.0 < r["sibling"] < 1.0 and r["ratio"] > 0.0
            assert len(r["ratio_by_site"]) == 16
    assert "| circle | shape |" in (tmp_path / "results.md").read_text()


def mc_words() -> tuple[str, ...]:
    from gie_guard.shapes.world import ATTRIBUTES

    return ATTRIBUTES


def test_output_rows_compare_win_shares_on_own_and_sibling_cells() -> None:
    mc = _module()
    from gie_guard.shapes.world import ATTRIBUTES

    labels = [[{"circle", "red", "plain"}, {"square", "blue", "plain"}], [set(), {"circle", "green", "dotted"}]]
    wins = np.zeros((2, len(ATTRIBUTES) + 1, 2))  # (images, words + null, cells)
    circle = ATTRIBUTES.index("circle")
    wins[0, circle] = [0.9, 0.2]  # circle wins on its own cell, rarely on the square's
    wins[1, circle] = [0.0, 0.7]
    wins[:, -1] = 0.01
    rows = {r["word"]: r for r in mc.output_rows({"site.a": wins, "site.b": wins * 0.5}, labels)}
    got = rows["circle"]
    assert (got["n_own"], got["n_sibling"]) == (2, 1)
    assert got["own"] == pytest.approx((0.8 + 0.4) / 2) and got["sibling"] == pytest.approx((0.2 + 0.1) / 2)
    assert got["best_site"] == "site.a" and got["best_own"] == pytest.approx(0.8)
    assert rows["zqxv"] == {"word": "zqxv", "kind": "null", "beats_every_word": pytest.approx(0.0075)}


@pytest.mark.parametrize("quantity", ["output", "residual"])
def test_smoke_run_of_the_output_quantities(tmp_path: pathlib.Path, quantity: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--backbone", "unet", "--quantity", quantity, "--smoke",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads((tmp_path / "results.json").read_text())
    assert (result["quantity"], result["images"], len(result["sites"])) == (quantity, 4, 16)
    for row in result["words"]:
        if row["kind"] == "null":
            assert 0.0 <= row["beats_every_word"] <= 1.0
        elif "own" in row:
            assert 0.0 <= row["sibling"] <= 1.0 and 0.0 <= row["own"] <= 1.0 and row["best_site"] in result["sites"]
    refused = subprocess.run([sys.executable, str(SCRIPT), "--backbone", "dit", "--quantity", quantity, "--smoke",
                              "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "use --backbone unet" in refused.stderr
