"""The two-cell shapes world (docs/shapes.md, "The two-cell world"): canvases, captions with
places in both orders, the per-cell detector, the grounding loss, the trainer and the
packaged model (offline, real weights)."""

import json

import numpy as np
import pytest
import torch

from gie_guard.shapes import load_pipeline
from gie_guard.shapes.detector import detect_cells, load_detector
from gie_guard.shapes.model import WORLDS
from gie_guard.shapes.text_encoder import load_tokenizer
from gie_guard.shapes.train_two import cell_masks, grounding_loss, token_cells
from gie_guard.shapes.world import Scene, Thing, render
from gie_guard.shapes.world_two import (
    CELLS, TwoScene, caption_for, render_two, sample_two_batch, sample_two_scene, split_cells,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RED_CIRCLE = Thing("circle", "red", "plain")
BLUE_SQUARE = Thing("square", "blue", "striped")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def detector():
    return load_detector()


def test_canvas_is_two_cells_on_one_background():
    rng = np.random.default_rng(0)
    image = render_two(TwoScene(RED_CIRCLE, None), rng)
    assert image.shape == (32, 64, 3) and image.dtype == np.uint8
    right = split_cells(image[None])["right"][0]
    # the empty cell is the background colour alone, the same as the left cell's corner
    assert (right == right[0, 0]).all() and (right[0, 0] == image[0, 0]).all()
    left = split_cells(image[None])["left"][0]
    assert (np.abs(left.astype(int) - right[0, 0]).sum(-1) > 60).mean() > 0.15  # a thing is drawn


def test_a_cell_is_drawn_as_a_one_thing_render():
    # the same rng stream: background, then the thing's jitter, as render() draws it
    canvas = render_two(TwoScene(None, BLUE_SQUARE), np.random.default_rng(5))
    alone = render(Scene((BLUE_SQUARE,)), np.random.default_rng(5))
    # the right cell comes after the empty left cell, which draws nothing from rng
    assert np.array_equal(canvas[:, 32:], alone)


def test_scene_sampling_mixes_one_and_two_things():
    rng = np.random.default_rng(1)
    scenes = [sample_two_scene(rng) for _ in range(400)]
    two = sum(s.left is not None and s.right is not None for s in scenes)
    one_left = sum(s.left is not None and s.right is None for s in scenes)
    one_right = sum(s.left is None and s.right is not None for s in scenes)
    assert two + one_left + one_right == 400
    assert 150 < two < 250 and one_left > 60 and one_right > 60
    assert all(s.left != s.right for s in scenes)


def _named(caption):
    return [(cell, caption.text[a:z]) for cell, a, z in caption.spans]


def test_captions_name_places_in_both_orders():
    scene = TwoScene(RED_CIRCLE, BLUE_SQUARE)
    rng = np.random.default_rng(2)
    lr = caption_for(scene, rng, form="left-right")
    assert lr.text.endswith(" on the right") and " on the left and a " in lr.text
    assert [c for c, _ in _named(lr)] == ["left", "right"]
    rl = caption_for(scene, rng, form="right-left")
    assert rl.text.endswith(" on the left") and " on the right and a " in rl.text
    assert [c for c, _ in _named(rl)] == ["right", "left"]
    assert [(c, lr.text[a:z]) for c, a, z in lr.places] == [("left", "left"), ("right", "right")]
    assert [(c, rl.text[a:z]) for c, a, z in rl.places] == [("right", "right"), ("left", "left")]
    # no places: the order is random, so it says nothing of where each thing goes
    orders = set()
    for _ in range(20):
        none = caption_for(scene, rng, form="no-place")
        assert "on the" not in none.text and none.places == () and " and a " in none.text
        orders.add(tuple(c for c, _ in _named(none)))
    assert orders == {("left", "right"), ("right", "left")}
    for cap in (lr, rl, none):
        words = dict(_named(cap))
        assert any(w in words["left"] for w in ("red", "crimson"))
        assert any(w in words["left"] for w in ("circle", "disc"))
        assert any(w in words["right"] for w in ("blue", "navy"))
        assert any(w in words["right"] for w in ("square", "box"))
        assert not any(w.startswith("a ") for _, w in _named(cap))  # spans skip the article


def test_one_thing_captions_say_its_place_or_nothing():
    rng = np.random.default_rng(3)
    placed = caption_for(TwoScene(None, RED_CIRCLE), rng, form="place")
    assert placed.text.endswith(" on the right") and _named(placed)[0][0] == "right"
    bare = caption_for(TwoScene(None, RED_CIRCLE), rng, form="no-place")
    assert "on the" not in bare.text and bare.text.startswith("a ")
    with pytest.raises(ValueError):
        caption_for(TwoScene(None, None), rng)


def test_detector_judges_each_cell(detector):
    rng = np.random.default_rng(4)
    images, scenes, _ = sample_two_batch(60, rng)
    found = detect_cells(detector, images)
    assert len(found) == 60
    for scene, f in zip(scenes, found):
        assert set(f) == set(CELLS)
        for cell, thing in scene.cells().items():
            assert f[cell] == (thing.words() if thing is not None else set()), (scene, f)


def test_detect_cells_refuses_one_cell_images(detector):
    with pytest.raises(ValueError):
        detect_cells(detector, np.zeros((1, 32, 32, 3), np.uint8))


def test_token_cells_mark_each_things_words(tokenizer):
    cap = caption_for(TwoScene(RED_CIRCLE, BLUE_SQUARE), np.random.default_rng(0), form="right-left")
    cells = token_cells(tokenizer, [cap, None])
    ids = tokenizer(cap.text, padding="max_length", max_length=77).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    marked = {tokens[t]: CELLS[int(cells[0, t].argmax())] for t in torch.nonzero(cells[0].sum(-1)).flatten()}
    assert {"left", "right"} == set(marked.values())
    for word, cell in marked.items():
        assert word not in ("a", "on", "the", "and", "left", "right", "[CLS]", "[SEP]"), marked
        if word in ("red", "crimson", "circle", "disc"):
            assert cell == "left"
        if word in ("blue", "navy", "square", "box", "striped"):
            assert cell == "right"
    assert cells[1].sum() == 0  # an empty caption grounds nothing
    with_places = token_cells(tokenizer, [cap], places=True)[0]
    extra = {tokens[t]: CELLS[int(with_places[t].argmax())]
             for t in torch.nonzero(with_places.sum(-1) - cells[0].sum(-1)).flatten()}
    assert extra == {"left": "left", "right": "right"}


def test_cell_masks_split_every_layer_in_halves():
    for n, w in ((128, 16), (32, 8), (8, 4), (2, 2)):
        m = cell_masks(n)
        assert m.shape == (n, 2) and (m.sum(1) == 1).all() and m[:, 0].sum() == n // 2
        assert m[0, 0] == 1 and m[w - 1, 1] == 1  # row-major: first pixel left, end of first row right
    with pytest.raises(ValueError):
        cell_masks(100)


def test_grounding_loss_is_zero_inside_and_a_quarter_when_uniform():
    cells = torch.zeros(1, 4, 2)
    cells[0, 1, 0] = 1.0  # token 1 names the left thing
    masks = cell_masks(32)
    inside = torch.zeros(1, 32, 4)
    inside[0, :, 1] = masks[:, 0] / 16  # all of token 1's attention on the left half
    inside[0, :, 0] = 1 - inside[0, :, 1]
    assert grounding_loss([inside], cells).item() < 1e-6
    uniform = torch.full((1, 32, 4), 0.25)
    assert abs(grounding_loss([uniform], cells).item() - 0.25) < 1e-6
    outside = torch.zeros(1, 32, 4)
    outside[0, :, 1] = masks[:, 1] / 16
    outside[0, :, 0] = 1 - outside[0, :, 1]
    assert abs(grounding_loss([outside], cells).item() - 1.0) < 1e-6


def test_unknown_world_is_refused():
    with pytest.raises(ValueError, match="world"):
        load_pipeline(world="three")
    with pytest.raises(ValueError, match="two-cell"):
        load_pipeline(world="two", variant="sink-pads")


def test_packaged_two_world_model_generates_a_canvas():
    meta = json.loads((WORLDS["two"] / "model.json").read_text())
    assert meta["world"] == "two" and meta["sample_size"] == [8, 16] and meta["steps"] > 0
    assert meta["warm_start_run"]["steps"] > 0  # the chained first run's record
    pipe = load_pipeline(world="two")
    image = pipe("a red circle on the left and a blue square on the right", num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 64, 3) and np.isfinite(image).all()
    # the default one-thing model is untouched by the world argument
    assert load_pipeline(world="one").unet.config.sample_size == 8


def test_trainer_writes_a_loadable_model(tmp_path):
    from gie_guard.shapes.train_two import main

    main(["--out", str(tmp_path), "--pool", "16", "--steps", "3", "--batch", "4", "--save-every", "2"])
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["steps"] == 3 and meta["world"] == "two" and meta["final_ground_loss"] is not None
    log = (tmp_path / "train.log").read_text()
    assert "saved EMA weights at step 2" in log and "saved EMA weights at step 3" in log
    pipe = load_pipeline(world="two", weights_dir=tmp_path)
    out = pipe("a red circle on the left", num_inference_steps=2, output_type="latent").images
    assert out.shape == (1, 4, 8, 16) and torch.isfinite(out).all()


def test_dit_trainer_writes_a_loadable_model(tmp_path):
    from gie_guard.shapes import dit_model as dm
    from gie_guard.shapes.dit_train_two import main

    main(["--out", str(tmp_path), "--pool", "16", "--steps", "3", "--batch", "4", "--save-every", "2"])
    meta = json.loads((tmp_path / dm.FILES["meta"]).read_text())
    assert meta["steps"] == 3 and meta["world"] == "two" and meta["final_ground_loss"] is not None
    pipe = load_pipeline(world="two", backbone="dit", weights_dir=tmp_path)
    # the left cell keeps the one-thing model's positions (rows 0-7, columns 0-7)
    shipped = load_pipeline(backbone="dit").transformer.pos_embed.cropped_pos_embed(8, 8).reshape(8, 8, -1)
    two = pipe.transformer.pos_embed.cropped_pos_embed(8, 16).reshape(8, 16, -1)
    assert torch.allclose(two[:, :8], shipped, atol=1e-6) and not torch.allclose(two[:, 8:], shipped, atol=1e-2)
    out = pipe("a red circle on the left", height=32, width=64, num_inference_steps=2, output_type="latent").images
    assert out.shape == (1, 4, 8, 16) and torch.isfinite(out).all()


def test_two_world_dit_without_weights_is_refused(tmp_path):
    with pytest.raises(ValueError, match="two-cell transformer"):
        load_pipeline(world="two", backbone="dit", weights_dir=tmp_path)


def test_quality_prompts_name_places_and_judge_per_cell():
    from gie_guard.shapes.quality_two import FORMS, judge, prompt_set

    rng = np.random.default_rng(0)
    for form in FORMS:
        for cap, want in prompt_set(form, 5, rng):
            assert ("on the" in cap.text) == (form in ("one, placed", "two, left-right", "two, right-left"))
            if form == "two, right-left":
                assert cap.text.endswith(" on the left") and [c for c, *_ in cap.spans] == ["right", "left"]
            if form.startswith("two"):
                assert want["left"] is not None and want["right"] is not None
    want = {"left": RED_CIRCLE, "right": BLUE_SQUARE}
    right = {"left": {"red", "circle", "plain"}, "right": {"blue", "square", "striped"}}
    assert judge("two, left-right", want, right) == {
        "shape": [True, True], "colour": [True, True], "style": [True, True], "layout": [True]}
    swapped = {"left": right["right"], "right": right["left"]}
    assert judge("two, left-right", want, swapped)["shape"] == [False, False]
    one = {"left": None, "right": RED_CIRCLE}
    assert judge("one, placed", one, {"left": {"red", "circle", "plain"}, "right": set()})["layout"] == [False]
    anywhere = {"left": RED_CIRCLE, "right": RED_CIRCLE}
    verdict = judge("one, no place", anywhere, {"left": set(), "right": {"red", "circle", "plain"}})
    assert verdict["shape"] == [True] and verdict["layout"] == [True]


def test_locality_masses_cover_every_cross_attention_layer():
    from gie_guard.shapes.quality_two import caption_masses, forward_order

    pipe = load_pipeline(world="two")
    cap = caption_for(TwoScene(RED_CIRCLE, BLUE_SQUARE), np.random.default_rng(0), form="left-right")
    masses, image = caption_masses(pipe, cap, seed=0)
    assert image.shape == (32, 64, 3) and len(masses) == 16
    assert forward_order(list(masses))[6] == "mid_block.attentions.0"
    n_tokens = int(token_cells(pipe.tokenizer, [cap])[0].sum())
    for own, other in masses.values():
        assert len(own) == len(other) == n_tokens
        assert all(o >= 0 and x >= 0 and o + x > 0 for o, x in zip(own, other))


def test_locality_refuses_an_unknown_own_cell_rule():
    from gie_guard.shapes.quality_two import locality

    with pytest.raises(ValueError, match="named"):
        locality(None, n=1, own="nearest")


def test_packaged_two_world_transformer_generates_a_canvas():
    from gie_guard.shapes import dit_model as dm

    meta = json.loads((WORLDS["two"] / dm.FILES["meta"]).read_text())
    assert meta["world"] == "two" and meta["backbone"] == "dit" and meta["steps"] > 0
    pipe = load_pipeline(world="two", backbone="dit")
    image = pipe("a red circle on the left and a blue square on the right", height=32, width=64,
                 num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 64, 3) and np.isfinite(image).all()
