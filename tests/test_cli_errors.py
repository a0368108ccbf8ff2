"""The gie-guard command's one error handler: every error of every command is one
`error: ...` line on stderr and exit status 1, Ctrl-C is 130, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gie_guard.cli import main

ROOT = Path(__file__).resolve().parents[1]


def interrupt():
    raise KeyboardInterrupt


def explode():
    raise RuntimeError("the factory broke")


def not_a_pipeline():
    return 42


@pytest.fixture
def bad_policy(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nconcepts: [{id: a, text: t, scale: -1}, {id: b, text: '', scale: 1}]\n")
    return path


def _one_error_line(capsys, expected_status, status):
    out, err = capsys.readouterr()
    assert status == expected_status, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("argv", "words"), [
    (["explain", "--prompt", "x", "--steps", "0", "--pipeline", "tiny"], "error: --steps and --columns must be at least 1"),
    (["explain", "--prompt", "x", "--columns", "-1"], "must be at least 1"),
    (["explain", "--prompt", "x", "--pipeline", "shapes", "--weights", "/nonexistent/weights"],
     "error: --pipeline shapes: no shapes-world weights in /nonexistent/weights (missing model.json"),
    (["explain", "--prompt", "x", "--policy", "no-such-policy", "--pipeline", "tiny"], "no shipped policy named 'no-such-policy'"),
    (["demo", "--pipeline", "nowhere", "--policy", "shapes-demo"], "--pipeline 'nowhere' is none of shapes, tiny, auto"),
    (["demo", "--steps", "0"], "error: --steps and --zoom must be at least 1"),
    (["policy", "explain", "no-such-policy"], "error: no-such-policy: no shipped policy named 'no-such-policy'"),
    (["adapter", "inspect", "/nonexistent/a.safetensors"], "/nonexistent/a.safetensors"),
    (["adapter", "train", "--pipeline", "test_cli_errors:explode", "--prompts", str(ROOT / "README.md"), "--concept", "x",
      "--scales", "1,2", "--judge", "test_cli_errors:not_a_pipeline", "--out", "/tmp/never.safetensors"],
     "error: RuntimeError: the factory broke"),
    (["adapter", "train", "--pipeline", "tiny", "--prompts", "/nonexistent/prompts.txt", "--concept", "x",
      "--scales", "1,2", "--judge", "nudenet", "--out", "/tmp/never.safetensors"],
     "error: /nonexistent/prompts.txt: no such file"),
])
def test_every_command_error_is_one_line_and_status_1(capsys, monkeypatch, argv, words):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    line = _one_error_line(capsys, 1, main(argv))
    assert words in line, line


def test_policy_problems_keep_file_line_place_problem(capsys, bad_policy):
    line = _one_error_line(capsys, 1, main(["demo", "--policy", str(bad_policy), "--pipeline", "tiny"]))
    assert line.startswith(f"error: {bad_policy}:2: concepts[0].scale: must be >= 0.0")
    assert line.endswith(f" (and 1 more: gie-guard policy check {bad_policy} lists them all)")


def test_ctrl_c_is_130_and_traceback_only_when_asked(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(["explain", "--prompt", "x", "--policy", "shapes-demo", "--pipeline", "test_cli_errors:interrupt"]) == 130
    assert capsys.readouterr().err == ""
    assert main(["--traceback", "explain", "--prompt", "x", "--pipeline", "test_cli_errors:explode"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: RuntimeError: the factory broke\nTraceback") and "def explode" not in err
    assert main(["explain", "--prompt", "x", "--pipeline", "test_cli_errors:not_a_pipeline"]) == 1
    assert "error: " in capsys.readouterr().err


def test_usage_errors_are_argparse_status_2(capsys):
    assert main(["adapter", "train", "--pipeline", "tiny", "--prompts", "p", "--concept", "x", "--scales", "1,a",
                 "--judge", "shapes", "--out", "o"]) == 2
    assert "argument --scales: expected comma-separated numbers, got '1,a'" in capsys.readouterr().err
    assert main(["adapter", "train", "--pipeline", "tiny", "--prompts", "p", "--concept", "x", "--scales", "1",
                 "--window", "0,0.5,1", "--judge", "shapes", "--out", "o"]) == 2
    assert "expected 2 comma-separated numbers" in capsys.readouterr().err


def test_explain_errors_never_print_a_traceback_from_the_console(tmp_path):
    """Today's `gie-guard explain` let ValueError (bad --steps) and FileNotFoundError (missing
    weights) escape; the installed command goes through the one handler."""
    for extra in (["--steps", "0"], ["--pipeline", "shapes", "--weights", str(tmp_path / "none")]):
        done = subprocess.run([sys.executable, "-m", "gie_guard.cli", "explain", "--prompt", "x", *extra],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_policy_check_and_explain_reach_includes_in_named_roots(tmp_path, capsys):
    from gie_guard.cli import main

    shared, mine = tmp_path / "shared", tmp_path / "mine"
    shared.mkdir()
    mine.mkdir()
    (shared / "base.yaml").write_text("name: base\nconcepts:\n  - {id: gun, text: gun, scale: 2.0}\n")
    (mine / "top.yaml").write_text("name: top\ndedup_threshold: 0\ninclude: [../shared/base.yaml]\nconcepts: []\n")
    assert main(["policy", "check", str(mine / "top.yaml")]) == 1
    assert "outside the folders policies may include from" in capsys.readouterr().err
    assert main(["policy", "check", str(mine / "top.yaml"), "--root", str(shared)]) == 0
    assert main(["policy", "explain", str(mine / "top.yaml"), "--root", str(shared)]) == 0
    assert "gun" in capsys.readouterr().out
