"""The gie-guard command: policy check / explain, and the demo's options."""

from __future__ import annotations

import subprocess
import sys
import textwrap
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
    good = _write(tmp_path, "good.yaml", "name: ok\nconcepts: []\n")
    bad = _write(tmp_path, "bad.yaml", "name: x\nfoo: 1\nconcepts:\n  - {id: a, text: '', scale: -2}\n")
    assert main(["policy", "check", str(good), str(bad), str(tmp_path / "missing.yaml")]) == 1
    out, err = capsys.readouterr()
    assert out == f"{good}: ok (policy 'ok', 0 concepts, 0 enabled)\n"
    expected = [
        f"{bad}:2: foo: unknown key 'foo' (allowed: version, name, description, include, inhibit_steps, ",
        f"{bad}:4: concepts[0].text: must not be empty",
        f"{bad}:4: concepts[0].scale: must be >= 0.0",
        f"{tmp_path / 'missing.yaml'}: no such policy file",
    ]
    lines = err.splitlines()
    assert len(lines) == len(expected) and all(line.startswith(start) for line, start in zip(lines, expected)), lines


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
    assert "policy 'artists' from shipped:artists" in out and "style-01 ('Van Gogh') <- style-01/1" in out


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
    assert done.stderr.startswith(f"{bad}:2: concepts[0].scale: must be >= 0.0") and done.stderr.count("\n") == 1


def test_policy_commands_import_neither_torch_nor_diffusers_nor_transformers(tmp_path):
    """`policy check` (and `policy explain` of a policy with nothing to deduplicate) run
    without the heavy libraries: gie_guard's own import is lazy."""
    warn = _write(tmp_path, "w.yaml", "name: w\ninhibit_steps: [0.9, 1.0]\nconcepts: [{id: a, text: a, scale: 1}]\n")
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        from gie_guard.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(["policy", "check", "nsfw", "shapes-demo", {str(warn)!r}, "--steps", "5"]) == 0
            assert main(["policy", "explain", "shapes-demo"]) == 0
        heavy = ("torch", "diffusers", "transformers", "sentence_transformers")
        print(sorted(m for m in heavy if m in sys.modules))
        from gie_guard import Guard  # the public names still import, on first use
        print("torch" in sys.modules and Guard.__module__)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[]", "gie_guard.guard"]


@pytest.mark.parametrize(("window", "steps", "words"), [
    ("[0.9, 1.0]", 5, "inhibit_steps [0.9, 1] is narrower than one step at 5 steps and covers none; "
                      "the widening rule inhibits step 4 only (of 0-4)"),
    ("[0.5, 0.52]", 20, "inhibit_steps [0.5, 0.52] is narrower than one step at 20 steps; it inhibits step 10 only"),
    ("[0.41, 0.44]", 20, "covers none; the widening rule inhibits step 8 only (of 0-19)"),
])
def test_check_warns_about_windows_narrower_than_one_step(tmp_path, capsys, window, steps, words):
    path = _write(tmp_path, "narrow.yaml", f"name: narrow\n# the window\ninhibit_steps: {window}\nconcepts: []\n")
    assert main(["policy", "check", str(path), "--steps", str(steps)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: ok (policy 'narrow', 0 concepts, 0 enabled)\n"
    assert err.startswith(f"{path}:3: warning: inhibit_steps {window.replace('.0]', ']')} ") and err.count("\n") == 1
    assert words in err
    assert main(["policy", "check", str(path), "--steps", "100"]) == 0  # wide enough at 100 steps
    assert capsys.readouterr().err == ""


def test_check_and_explain_take_steps(capsys):
    assert main(["policy", "check", "shapes-demo", "--steps", "0"]) == 1
    assert capsys.readouterr().err == "error: --steps must be at least 1, got 0\n"
    assert main(["policy", "explain", "shapes-demo", "--steps", "10"]) == 0
    assert "(at 10 steps: steps 0-7)" in capsys.readouterr().out


def test_policy_errors_are_formatted_in_one_place():
    import gie_guard.cli as cli
    from gie_guard.errors import PolicyError

    assert not hasattr(cli, "format_problem")
    error = PolicyError("must not be empty", file="p.yaml", line=4, column=7, place="concepts[0].text")
    assert str(error) == "p.yaml:4:7: concepts[0].text: must not be empty"
    assert error.format(column=False) == cli.format_error(error) == "p.yaml:4: concepts[0].text: must not be empty"


def test_the_console_script_is_gie_guard_cli_main():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="gie-guard")
    assert script.value == "gie_guard.cli:main" and script.load() is main


def test_policy_labels_maps_the_services_labels_to_ids(capsys, monkeypatch):
    from gie_guard.serving.schemas import concept_label

    assert main(["policy", "labels", "nsfw"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"{concept_label('nsfw', 'nsfw-01')}  nsfw-01" in lines and f"{concept_label('nsfw', 'nsfw-01/1')}  nsfw-01/1" in lines
    monkeypatch.setenv("GIE_TEST_LABEL_KEY", "s3cret")
    assert main(["policy", "labels", "nsfw", "--key-env", "GIE_TEST_LABEL_KEY"]) == 0
    assert f"{concept_label('nsfw', 'nsfw-01', 's3cret')}  nsfw-01" in capsys.readouterr().out.splitlines()
    monkeypatch.delenv("GIE_TEST_LABEL_KEY")
    assert main(["policy", "labels", "nsfw", "--key-env", "GIE_TEST_LABEL_KEY"]) == 1
    assert "GIE_TEST_LABEL_KEY is not set" in capsys.readouterr().err
