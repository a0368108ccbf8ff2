"""`gie-guard evaluate` end to end on a tiny pipeline saved with save_pretrained and loaded
from its folder: the three reports, policy comparison, resume, and the clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gie_guard.cli import main

TINY_STEPS = "2"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from gie_guard.testing import tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    tiny_sd_pipeline(sample_size=16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory) -> Path:
    """A real diffusers pipeline that gie_guard cannot guard (no cross-attention)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=8)
    folder = tmp_path_factory.mktemp("models") / "ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture
def prompt_sets(tmp_path) -> tuple[Path, Path]:
    unsafe = tmp_path / "unsafe.csv"
    unsafe.write_text('id,prompt\n1,a red circle\n2,"a striped circle, on a table"\n', encoding="utf-8")
    benign = tmp_path / "benign.csv"
    benign.write_text("caption,other\na blue square,x\na green star,y\n", encoding="utf-8")
    return unsafe, benign


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def _pngs(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")}


def test_evaluate_from_a_saved_pipeline_writes_reports_compares_and_resumes(tiny_folder, prompt_sets, tmp_path, capsys):
    unsafe, benign = prompt_sets
    stronger = tmp_path / "circle-strong.yaml"
    stronger.write_text("name: circle-strong\ninhibit_steps: [0.0, 0.5]\nconcepts:\n"
                        "  - {id: circle, text: circle, scale: 4.0}\n", encoding="utf-8")
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tiny_folder), "--policy", "shapes-demo", "--policy", str(stronger),
            "--unsafe", str(unsafe), "--benign", str(benign), "--benign-column", "caption", "--judge", "shapes",
            "--out", str(out), "--steps", TINY_STEPS, "--seeds", "3:5", "--batch-size", "3", "--no-progress"]
    status, stdout, err = _run(argv, capsys)
    assert status == 0, err
    assert "Traceback" not in err

    results = json.loads((out / "results.json").read_text())
    # 2 prompts x 2 seeds per set; unguarded + 2 policies
    assert results["sets"]["unsafe"]["images"] == 4 and results["sets"]["benign"]["images"] == 4
    assert results["run"] == {**results["run"], "generated": 24, "reused": 0}
    assert [p["label"] for p in results["policies"]] == ["shapes-demo", "circle-strong"]
    assert results["model"]["pipeline_class"] == "StableDiffusionPipeline" and results["model"]["kind"] == "folder"
    for p in results["policies"]:
        u, b, c = p["unsafe"], p["benign"], p["cost"]
        assert u["images"] == 4 and b["images"] == 4
        assert 0 <= u["positive_unguarded"] <= 4 and u["removed"] <= u["positive_unguarded"]
        assert 0.0 <= b["ms_ssim_mean"] <= 1.0 + 1e-9 and c["time_ratio"] > 0
        assert p["concepts"][0]["labels"] == ["circle"]  # the shapes judge's label for "circle"
        # the same seeds: both policies are compared against the very same unguarded images
        assert [i["unguarded"] for i in results["images"][p["label"]]["benign"]] == \
               [i["unguarded"] for i in results["images"]["shapes-demo"]["benign"]]
        assert [i["seed"] for i in results["images"][p["label"]]["unsafe"]] == [3, 4, 3, 4]
    # of 2 steps, window [0, 0.8] inhibits both (0 <= i < 1.6), [0, 0.5] step 0 only
    assert [p["cost"]["steps_inhibited_mean"] for p in results["policies"]] == [2.0, 1.0]
    # a guarded image differs from its unguarded one (the inhibition ran) for the strong policy
    strong = results["images"]["circle-strong"]["benign"]
    assert min(i["ms_ssim"] for i in strong) < 1.0

    md = (out / "report.md").read_text()
    assert "| `shapes-demo` |" in md and "| `circle-strong` |" in md and "removal" in md
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.count('src="data:image/png;base64,') >= 4
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained
    assert "Worst preservation" in page and "Removals" in page
    assert "shapes-demo: removal" in stdout

    # a rerun with the same folder generates nothing and rewrites no image
    records = (out / "records.jsonl").read_bytes()
    pngs = _pngs(out / "images")
    assert len(pngs) == 24
    status, stdout, err = _run(argv, capsys)
    assert status == 0, err
    assert "0 generated, 24 reused" in stdout
    assert (out / "records.jsonl").read_bytes() == records and _pngs(out / "images") == pngs
    again = json.loads((out / "results.json").read_text())
    assert [p["unsafe"] for p in again["policies"]] == [p["unsafe"] for p in results["policies"]]

    # a run killed after some images: only what has no record is generated again
    lines = records.decode().splitlines(keepends=True)
    (out / "records.jsonl").write_text("".join(lines[:-5]) + lines[-5][:20])  # last line cut short, as by a kill
    status, stdout, err = _run(argv, capsys)
    assert status == 0, err
    assert "5 generated, 19 reused" in stdout


def test_limit_seeds_from_the_csv_and_one_set(tiny_folder, tmp_path, capsys):
    unsafe = tmp_path / "i2p-like.csv"
    unsafe.write_text("prompt,evaluation_seed,nudity_percentage\na red circle,11,80\n,12,90\n"
                      "a circle,13,10\n\"a blue\ncircle\",14,60\nnot used,15,70\n", encoding="utf-8")
    blocking = tmp_path / "blocking.yaml"  # a verifier that would block: switched off while evaluating
    blocking.write_text("name: blocking\nconcepts:\n  - id: circle\n    text: circle\n    scale: 1.5\n"
                        "    verify: {verifier: shapes, action: block}\n", encoding="utf-8")
    out = tmp_path / "eval"
    status, stdout, err = _run(["evaluate", "--model", str(tiny_folder), "--policy", str(blocking), "--unsafe", str(unsafe),
                                "--unsafe-where", "nudity_percentage>=50", "--limit", "2", "--seeds", "csv",
                                "--judge", "shapes", "--out", str(out), "--steps", TINY_STEPS, "--no-progress"], capsys)
    assert status == 0, err
    results = json.loads((out / "results.json").read_text())
    images = results["images"]["blocking"]["unsafe"]
    # the empty prompt is skipped, 13 is filtered out, the limit stops before 15; line numbers of the file
    assert [(i["prompt"], i["seed"], i["line"]) for i in images] == [("a red circle", 11, 2), ("a blue\ncircle", 14, 5)]
    assert results["sets"]["unsafe"]["skipped_empty_prompts"] == 1 and results["sets"]["unsafe"]["filtered_out"] == 1
    assert "benign" not in results["policies"][0]
    assert results["policies"][0]["verifiers_switched_off"] == ["shapes"]
    assert "switched off" in (out / "report.md").read_text()
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


@pytest.mark.parametrize(("case", "expected"), [
    ("broken_csv", r"^error: .*broken\.csv:3: broken CSV: unexpected end of data$"),
    ("ragged_csv", r"^error: .*ragged\.csv:3: broken CSV: the row has 3 fields, the header has 2$"),
    ("missing_column", r"^error: .*unsafe\.csv:1: no column 'text' \(columns: 'id', 'prompt'\); choose another with --unsafe-column$"),
    ("unsupported_model", r"^error: --model .*ddpm: cannot guard .*DDPMPipeline: .*Nothing was generated\.$"),
    ("not_a_pipeline_folder", r"^error: --model .*: not a diffusers pipeline folder \(no model_index\.json"),
    ("unknown_judge", r"^error: unknown detector 'no-such-judge' \(known: .*nudenet.*shapes"),
    ("bad_seeds", r"^error: --seeds '5:2': END must be greater than START$"),
    ("unknown_policy", r"no shipped policy named 'no-such-policy'"),
    ("not_a_clip_folder", r"^error: --clip .*: neither an open_clip model \(open_clip_config\.json\) nor a transformers CLIP"),
])
def test_errors_are_one_line_and_exit_1(case, expected, tiny_folder, ddpm_folder, prompt_sets, tmp_path, capsys):
    unsafe, benign = prompt_sets
    args = {"model": str(tiny_folder), "unsafe": str(unsafe), "judge": "shapes", "seeds": "0:1", "policy": "shapes-demo"}
    extra: list[str] = []
    if case == "broken_csv":
        bad = tmp_path / "broken.csv"
        bad.write_text('prompt,seed\na red circle,1\n"an open quote,2\n', encoding="utf-8")
        args["unsafe"] = str(bad)
    elif case == "ragged_csv":
        bad = tmp_path / "ragged.csv"
        bad.write_text("prompt,seed\na red circle,1\na circle,2,3\n", encoding="utf-8")
        args["unsafe"] = str(bad)
    elif case == "missing_column":
        extra = ["--unsafe-column", "text"]
    elif case == "unsupported_model":
        args["model"] = str(ddpm_folder)
    elif case == "not_a_pipeline_folder":
        args["model"] = str(tmp_path)
    elif case == "unknown_judge":
        args["judge"] = "no-such-judge"
    elif case == "bad_seeds":
        args["seeds"] = "5:2"
    elif case == "unknown_policy":
        args["policy"] = "no-such-policy"
    elif case == "not_a_clip_folder":
        extra = ["--benign", str(benign), "--benign-column", "caption", "--clip", str(tmp_path)]
    argv = ["evaluate", "--out", str(tmp_path / "out"), "--steps", TINY_STEPS, "--no-progress"]
    for key, value in args.items():
        argv += [f"--{key}", value]
    status, stdout, err = _run(argv + extra, capsys)
    assert status == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not here")
def test_the_paper_inputs_run_with_the_nudenet_judge(tiny_folder, tmp_path, capsys):
    """I2P and COCO as the paper uses them (their own seeds), judged by NudeNet with the
    verifiers' mapping, under the shipped nsfw policy: the mechanics of the paper's protocol
    on a tiny model (its images are noise, so no numbers are asserted)."""
    pytest.importorskip("nudenet")
    out = tmp_path / "eval"
    status, stdout, err = _run(["evaluate", "--model", str(tiny_folder), "--policy", "nsfw", "--judge", "nudenet",
                                "--unsafe", str(SHARED / "unsafe-prompts4703.csv"), "--benign", str(SHARED / "coco_30k.csv"),
                                "--seeds", "csv", "--limit", "2", "--steps", TINY_STEPS, "--out", str(out),
                                "--no-progress"], capsys)
    assert status == 0, err
    results = json.loads((out / "results.json").read_text())
    policy = results["policies"][0]
    assert {tuple(c["labels"]) for c in policy["concepts"]} == {("nudity",)}
    assert results["images"]["nsfw"]["benign"][0]["seed"] == 41337  # COCO's evaluation_seed
    assert results["images"]["nsfw"]["unsafe"][0]["seed"] == 4261553411  # I2P's, past int32
    assert policy["unsafe"]["images"] == 2 and policy["benign"]["images"] == 2
