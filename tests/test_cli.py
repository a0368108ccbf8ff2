"""The gie-guard command: policy check / explain, and the demo's options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gie_guard.cli import build_parser, main
from gie_guard.policy import shipped_policy_dir

from test_policy_errors import CASES  # pytest puts tests/ on sys.path

ROOT = Path(__file__).resolve().parents[1]


def _write(folder: Path, name: str, content: str) -> Path:
    path = folder / name
    path.write_text(content, encoding="utf-8")
    return path


def test_check_passes_shipped_policies(capsys):
    files = sorted(str(p) for p in shipped_policy_dir().glob("*.yaml"))
    assert main(["policy", "check", *files]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.count(": ok (policy ") == len(files)


@pytest.mark.parametrize(("content", "line", "place", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_reports_file_line_message(tmp_path, capsys, content, line, place, words):
    path = _write(tmp_path, "bad.yaml", content)
    assert main(["policy", "check", str(path)]) == 1
    out, err = capsys.readouterr()
    first = err.splitlines()[0]
    assert first.startswith(f"{path}:{line}: " + (f"{place}: " if place else ""))
    assert words in first and "Traceback" not in err and out == ""


def test_check_reports_every_problem_of_every_file(tmp_path, capsys):
    good = _write(tmp_path, "good.yaml", "name: ok\n")
    bad = _write(tmp_path, "bad.yaml", "name: x\nfoo: 1\nconcepts:\n  - {id: a, text: '', scale: -2}\n")
    assert main(["policy", "check", str(good), str(bad), str(tmp_path / "missing.yaml")]) == 1
    out, err = capsys.readouterr()
    assert out == f"{good}: ok (policy 'ok', 0 concepts, 0 enabled)\n"
    assert err.splitlines() == [
        f"{bad}:2: foo: unknown key 'foo' (allowed: version, name, description, include, inhibit_steps, "
        "dedup_threshold, on_missing_adapter, auto_scale, concepts)",
        f"{bad}:4: concepts[0].text: must not be empty",
        f"{bad}:4: concepts[0].scale: must be >= 0.0 (got -2)",
        f"{tmp_path / 'missing.yaml'}: no such policy file",
    ]


def test_check_never_prints_a_traceback_for_odd_inputs(tmp_path, capsys):
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    assert main(["policy", "check", str(folder)]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_explain_shows_merges_and_scale_sources(tmp_path, capsys):
    _write(tmp_path, "base.yaml", "name: base\nconcepts:\n  - {id: cat, text: cat, scale: auto}\n")
    path = _write(tmp_path, "top.yaml", "name: top\ninclude: [base.yaml]\nconcepts:\n"
                  "  - {id: nude, text: nude, aliases: [naked], scale: 3}\n  - {id: dog, text: dog, enabled: false}\n")
    assert main(["policy", "explain", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"policy 'top' from {path}" in out
    assert "concepts (2 after deduplication of 3)" in out
    assert "adapter, clamped to [0, 20]; 5 without one" in out and f"{tmp_path / 'base.yaml'}:3" in out
    assert "fixed in the policy" in out
    assert "nude ('nude') <- nude/1 ('naked')   0.165" in out
    assert "disabled: dog" in out


def test_explain_shipped_name(capsys):
    assert main(["policy", "explain", "artists"]) == 0
    out = capsys.readouterr().out
    assert "policy 'artists' from shipped:artists" in out and "van-gogh ('Van Gogh') <- van-gogh/1" in out


def test_explain_bad_policy(tmp_path, capsys):
    assert main(["policy", "explain", "no-such-policy"]) == 1
    assert "no shipped policy named 'no-such-policy'" in capsys.readouterr().err


def test_demo_options_and_usage_errors(capsys):
    args = build_parser().parse_args(["demo"])
    assert (args.policy, args.out, args.seed) == ("shapes-demo", "gie-guard-demo.png", 0) and args.prompt
    args = build_parser().parse_args(["demo", "--prompt", "a circle", "--seed", "3", "--policy", "x.yaml"])
    assert (args.prompt, args.seed, args.policy) == ("a circle", 3, "x.yaml")
    assert main(["policy"]) == 2
    assert main([]) == 2
    assert "usage: gie-guard" in capsys.readouterr().err


def test_console_entry_point_runs_as_a_module(tmp_path):
    bad = _write(tmp_path, "bad.yaml", "name: x\nconcepts: [{id: a, text: t, scale: -1}]\n")
    done = subprocess.run([sys.executable, "-m", "gie_guard.cli", "policy", "check", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == f"{bad}:2: concepts[0].scale: must be >= 0.0 (got -1)"
