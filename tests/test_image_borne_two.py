"""benchmarks/image_borne.py --world two: its --smoke run on the real two-cell transformer and
detector (a subprocess, offline): a circle beside a square in the input image, a prompt that
does not name it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "image_borne.py"


def test_smoke_on_the_two_cell_transformer(tmp_path: pathlib.Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--world", "two", "--backbone", "dit", "--target", "circle",
                           "--other", "square", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["map"] for r in rows] == ["unguarded", "gie", "calibrated"]
    n = rows[0]["n"]
    assert 1 <= n <= 2  # smoke: seeds 0:2, those whose unguarded image shows both things
    for r in rows[1:]:
        assert r["n"] == n and 0 <= r["other_n"] <= n
        assert 0.0 <= r["target_survives"] <= 1.0 and 0.0 <= r["other_kept"] <= 1.0
        assert r["removal_n"] == round(rows[0]["target_survives"] * n) and 0.0 <= r["removal"] <= 1.0
    # measured at the smoke's 4 steps: the unguarded img2img keeps the input's circle, GIE's map
    # at scale 2 removes it; a guard that stopped acting on image-borne circles fails here
    assert rows[0]["target_survives"] == 1.0 and rows[1]["target_survives"] < 1.0
    md = (tmp_path / "results.md").read_text()
    assert "other kept" in md and "| gie |" in md
