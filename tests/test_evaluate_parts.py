"""Parts of `gie-guard evaluate`: prompt CSVs (also the shared I2P and COCO files), MS-SSIM,
the measures, judge labels, the CLIP score, and the shapes prompt sets against erasure.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from gie_guard.errors import ConfigurationError
from gie_guard.evaluate.measures import benign_measures, ms_ssim, unsafe_measures
from gie_guard.evaluate.prompts import parse_seeds, parse_where, read_prompt_set

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


# -- prompt sets --------------------------------------------------------------------------------

def test_seed_ranges_expand_every_prompt(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\nfirst\nsecond\n", encoding="utf-8")
    rows = read_prompt_set(path, name="benign", seeds=parse_seeds("7:9")).rows
    assert [(r.index, r.prompt, r.seed, r.line) for r in rows] == [
        (0, "first", 7, 2), (0, "first", 8, 2), (1, "second", 7, 3), (1, "second", 8, 3)]
    assert parse_seeds("4") == parse_seeds("4:5")


@pytest.mark.parametrize(("content", "kwargs", "message"), [
    (b"prompt,evaluation_seed\na,1\nb,x\n", {"seeds": parse_seeds("csv")},
     r"p\.csv:3: column 'evaluation_seed': 'x' is not a seed"),
    (b"prompt\n\xff\xfe broken\n", {}, r"p\.csv:2: not UTF-8 text"),
    (b"", {}, r"p\.csv: empty file; expected a header row with a 'prompt' column"),
    (b"prompt\n\n  \n", {}, r"p\.csv: no prompts in column 'prompt'"),
    (b"prompt,n\na,5\n", {"where": [parse_where("n>9")]}, r"no prompts in column 'prompt' \(1 filtered out by --unsafe-where\)"),
    (b"prompt,n\na,five\n", {"where": [parse_where("n>9")]}, r"p\.csv:2: --where n>9: 'five' is not a number"),
    (b'prompt\n"a ' + b"x" * 70_000 + b'"\n', {}, r"p\.csv:\d+: broken CSV: field larger than field limit"),
])
def test_csv_problems_name_file_line_and_problem(tmp_path, content, kwargs, message):
    path = tmp_path / "p.csv"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError, match=message):
        read_prompt_set(path, name="unsafe", option="--unsafe", **kwargs)


def test_missing_file_and_bad_options(tmp_path):
    with pytest.raises(ConfigurationError, match=r"--benign .*nowhere\.csv: no such file"):
        read_prompt_set(tmp_path / "nowhere.csv", name="benign")
    for text in ("a:b", "3:3", "-1:2"):
        with pytest.raises(ConfigurationError, match="--seeds"):
            parse_seeds(text)
    with pytest.raises(ConfigurationError, match="COLUMN OP VALUE"):
        parse_where("nudity_percentage")


def test_where_filters(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,categories,score\na,\"sexual, violence\",60\nb,hate,70\nc,Sexual,10\n", encoding="utf-8")

    def prompts(*exprs):
        return [r.prompt for r in read_prompt_set(path, name="unsafe", where=[parse_where(e) for e in exprs]).rows]

    assert prompts("categories~sexual") == ["a", "c"]
    assert prompts("categories~sexual", "score>=50") == ["a"]
    assert prompts("score<50") == ["c"] and prompts("categories=hate") == ["b"] and prompts("score!=70") == ["a", "c"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not here")
def test_the_shared_prompt_sets_read_as_the_paper_uses_them():
    i2p = read_prompt_set(SHARED / "unsafe-prompts4703.csv", name="unsafe", seeds=parse_seeds("csv"))
    assert i2p.prompts == 4702 and i2p.skipped_empty == 1  # one I2P row has no prompt
    assert max(r.seed for r in i2p.rows) > 2**31  # I2P's seeds go past int32; torch takes them
    assert any("\n" in r.prompt for r in i2p.rows)  # multi-line prompts stay whole
    nude = read_prompt_set(SHARED / "unsafe-prompts4703.csv", name="unsafe", where=[parse_where("nudity_percentage>=50")])
    assert 0 < nude.prompts < 4702
    coco = read_prompt_set(SHARED / "coco_30k.csv", name="benign", seeds=parse_seeds("csv"), limit=100)
    assert coco.prompts == 100 and coco.rows[0].seed == 41337
    art = read_prompt_set(SHARED / "famous_art_prompts.csv", name="unsafe", seeds=parse_seeds("0:2"))
    assert art.prompts == 20 and len(art.rows) == 40


# -- measures -----------------------------------------------------------------------------------

def _images(n=3, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_ms_ssim_is_one_for_identical_images_and_falls_with_noise():
    rng = np.random.default_rng(1)
    # a smooth image (structure MS-SSIM can see)
    y, x = np.mgrid[0:64, 0:64]
    base = np.stack([(127 + 100 * np.sin(x / 6.0 + k) * np.cos(y / 9.0)).astype(np.uint8) for k in range(3)], -1)
    ref = np.stack([base] * 4)
    noisy = [np.clip(base + rng.normal(0, s, base.shape), 0, 255).astype(np.uint8) for s in (0, 5, 20, 60)]
    values = ms_ssim(ref, np.stack(noisy))
    assert values[0] == pytest.approx(1.0, abs=1e-9)
    assert values[0] > values[1] > values[2] > values[3] >= 0.0
    assert ms_ssim(np.stack(noisy), ref) == pytest.approx(values)  # symmetric


@pytest.mark.parametrize("size", [8, 16, 32, 200])
def test_ms_ssim_handles_small_and_large_images(size):
    a, b = _images(2, size, 0), _images(2, size, 1)
    v = ms_ssim(a, b)
    assert v.shape == (2,) and np.all((v >= 0) & (v <= 1))
    assert ms_ssim(a, a) == pytest.approx([1.0, 1.0])


def test_unsafe_measures_count_as_erasure_py_does():
    f = frozenset
    before = [f({"circle", "red"}), f({"circle"}), f({"square"}), f({"circle", "striped"})]
    after = [f({"red"}), f({"circle"}), f({"circle"}), f({"striped", "square"})]
    m = unsafe_measures(before, after, {"circle": ("c",)})
    # present unguarded in 3, gone guarded in 2 of them; 2 of 4 positive guarded; one appeared
    assert (m["positive_unguarded"], m["removed"], m["removal"]) == (3, 2, pytest.approx(2 / 3))
    assert (m["positive_guarded"], m["residual"], m["unguarded_rate"], m["appeared"]) == (2, 0.5, 0.75, 1)
    assert m["label_counts"]["circle"] == {"unguarded": 3, "guarded": 2}
    assert m["label_counts"]["square"] == {"unguarded": 1, "guarded": 1}
    two = unsafe_measures(before, after, {"circle": ("c",), "red": ("r",)})
    assert two["per_label"]["red"]["removal"] == 0.0 and two["per_label"]["circle"]["removal"] == pytest.approx(2 / 3)
    none = unsafe_measures([f()], [f()], {"circle": ("c",)})
    assert none["removal"] is None and none["residual"] == 0.0


def test_benign_measures():
    f = frozenset
    before = [f({"red", "square"}), f({"blue", "star"}), f()]
    after = [f({"red", "square"}), f({"blue", "circle"}), f({"circle"})]
    m = benign_measures(before, after, {"circle"}, np.array([1.0, 0.5, 0.8]), np.array([True, False, False]))
    assert m["labels_kept"] == pytest.approx(3 / 4) and m["changed"] == pytest.approx(2 / 3)
    assert (m["false_positive_unguarded"], m["false_positive_guarded"]) == (0.0, pytest.approx(2 / 3))
    assert m["identical"] == pytest.approx(1 / 3) and m["ms_ssim_min"] == 0.5


# -- judge labels --------------------------------------------------------------------------------

def test_concept_labels_follow_the_rules():
    from gie_guard.detectors.nudenet import NUDENET_LABELS, NudeNetDetector
    from gie_guard.evaluate.judge import Judge
    from gie_guard.policy import load_policy

    pytest.importorskip("nudenet")
    nsfw = load_policy("nsfw")
    judge = Judge("nudenet")
    assert isinstance(judge.detector, NudeNetDetector)  # the verifiers' detector and mapping
    labels = judge.concept_labels(nsfw)
    assert {c.labels for c in labels} == {tuple(sorted(set(NUDENET_LABELS.values())))} == {("nudity",)}

    shapes = Judge("shapes")
    policy = load_policy({"name": "p", "dedup_threshold": 0.0, "concepts": [
        {"id": "a", "text": "disc", "scale": 1.0},
        {"id": "b", "text": "crimson paint", "scale": 1.0},
        {"id": "c", "text": "anything", "scale": 1.0, "verify": {"verifier": "shapes", "labels": ["striped"]}},
    ]})
    assert [(c.concept_id, c.labels, c.rule) for c in shapes.concept_labels(policy)] == [
        ("a", ("circle",), "shapes"), ("b", ("red",), "shapes"), ("c", ("striped",), "verify")]
    assert {c.labels for c in Judge("shapes", labels=["star"]).concept_labels(policy)} == {("star",)}
    unknown = load_policy({"name": "q", "concepts": [{"id": "x", "text": "van gogh", "scale": 1.0}]})
    with pytest.raises(ConfigurationError, match=r"concept 'x' \('van gogh'\) names no shapes-world attribute"):
        shapes.concept_labels(unknown)


# -- CLIP score ----------------------------------------------------------------------------------

def test_clip_score_from_a_local_transformers_clip_folder(tmp_path):
    from gie_guard.evaluate.clipscore import load_clip
    from gie_guard.testing import clip_tokenizer

    try:
        tokenizer = clip_tokenizer()
    except Exception as exc:  # the BPE file ships in open-clip-torch
        pytest.skip(f"no CLIP tokenizer files: {exc}")
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    scorer = load_clip(str(tmp_path / "clip"))
    images = _images(3, 48)
    scores = scorer(images, ["a red circle", "a dog", "a red circle"])
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 100))
    assert scorer(images[:1], ["a red circle"])[0] == pytest.approx(scores[0], rel=1e-5)
    assert scores[0] != pytest.approx(scorer(images[:1], ["a dog"])[0])  # the text matters
    with pytest.raises(ConfigurationError, match="neither an open_clip model"):
        load_clip(str(tmp_path))


# -- the shapes model's prompt sets are erasure.py's ----------------------------------------------

def _erasure_module():
    spec = importlib.util.spec_from_file_location("erasure_bench", ROOT / "benchmarks" / "erasure.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["erasure_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_shapes_prompt_sets_are_erasure_py_prompts(tmp_path):
    from gie_guard.evaluate.shapes import benign_rows, unsafe_rows, write_prompt_sets

    erasure = _erasure_module()
    seeds = range(0, 6)
    own = [c for c in erasure.columns_for("shape") if c.attribute == "circle"]
    assert [(r["prompt"], r["seed"]) for r in unsafe_rows("circle", seeds)] == [(c.prompt(s), s) for c in own for s in seeds]
    others = [c for k in erasure.KINDS for c in erasure.columns_for(k) if not c.held_out and c.attribute != "circle"]
    expected = [(c.prompt(s), s) for c in others for s in seeds if "circle" not in set(c.attributes(s).values())]
    assert [(r["prompt"], r["seed"]) for r in benign_rows("circle", seeds)] == expected
    unsafe, benign = write_prompt_sets("circle", seeds, tmp_path)
    rows = read_prompt_set(unsafe, name="unsafe", seeds=parse_seeds("csv", column="seed")).rows
    assert [(r.prompt, r.seed) for r in rows] == [(c.prompt(s), s) for c in own for s in seeds]


def test_the_shapes_prompts_command_writes_the_comparison_policy_too(tmp_path, capsys):
    """docs/evaluate.md's second command names circle-w2.yaml: the first writes it, so the
    pair runs in a fresh folder; it is the policy the shipped results were made with."""
    from gie_guard.evaluate.shapes import main
    from gie_guard.policy import read_policy

    assert main(["prompts", "--target", "circle", "--seeds", "0:2", "--out", str(tmp_path)]) == 0
    assert "circle-w2.yaml" in capsys.readouterr().out
    written = read_policy(str(tmp_path / "circle-w2.yaml")).policy
    shipped = read_policy(str(ROOT / "benchmarks" / "results" / "evaluate-shapes" / "circle-w2.yaml")).policy
    assert written.model_dump(exclude={"description"}) == shipped.model_dump(exclude={"description"})


# -- models --------------------------------------------------------------------------------------

def test_a_folder_pipeline_loads_without_its_safety_checker_unless_asked(tmp_path):
    """SD 1.x folders carry a safety checker that blacks out flagged images; the judge must see
    what the model draws, so evaluation leaves it out by default."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from gie_guard.evaluate.models import load_model
    from gie_guard.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(sample_size=16)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                           num_hidden_layers=1, image_size=32, patch_size=8), projection_dim=16)
    pipe.register_modules(safety_checker=StableDiffusionSafetyChecker(config).eval(),
                          feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    pipe.save_pretrained(tmp_path / "sd")
    plain = load_model(str(tmp_path / "sd"), device="cpu")
    assert plain.pipe.safety_checker is None and "safety checker left out" in plain.description
    kept = load_model(str(tmp_path / "sd"), device="cpu", keep_safety_checker=True)
    assert kept.pipe.safety_checker is not None
    assert kept.identity != plain.identity  # different images, different keys
    assert plain.family == "sd" and (plain.steps, plain.guidance, plain.batch_size) == (50, None, 1)
    with pytest.raises(ConfigurationError, match="--dtype 'float8'"):
        load_model(str(tmp_path / "sd"), device="cpu", dtype="float8")


def test_the_transformer_shapes_model_is_detected_not_required():
    """`--model shapes-dit` loads the transformer shapes model when its weights are packaged,
    and is a clear error while they are not."""
    from gie_guard.evaluate.models import dit_weights_present, load_model

    if dit_weights_present():
        model = load_model("shapes-dit", device="cpu")
        assert (model.kind, model.family, type(model.pipe).__name__) == ("shapes-dit", "sd3", "StableDiffusion3Pipeline")
        assert (model.steps, model.guidance, model.batch_size) == (20, 5.0, 32)
    else:
        with pytest.raises(ConfigurationError, match="shapes-dit: the transformer shapes model has no packaged weights"):
            load_model("shapes-dit", device="cpu")
