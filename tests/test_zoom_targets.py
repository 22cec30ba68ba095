"""zoom_target: teacher completions that look at the densest groups and answer them off the crops (hand-worked)."""

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dip_r1.data.prompts import smart_resize, to_model_coords
from dip_r1.rewards import parse_completion
from dip_r1.zoom import crop_regions, resolve_regions, zoom_target
from dip_r1.zoom.targets import dense_regions

BUDGET = {"factor": 32, "min_pixels": 1024, "max_pixels": 160 * 120}
# Source 400 x 200: three people side by side, one alone far away.
PEOPLE = torch.tensor(
    [[100.0, 100, 120, 140], [124, 100, 144, 140], [300, 20, 320, 60], [148, 104, 168, 144]]
)


def make_target(source_boxes: torch.Tensor, coordinates: str, orig=(400, 200), resized=(200, 100)) -> dict:
    return {
        "boxes": to_model_coords(source_boxes, orig, resized, coordinates),
        "labels": ["person"] * len(source_boxes),
        "orig_size": orig,
        "resized_size": resized,
        "coordinates": coordinates,
    }


def answer_of(text: str) -> list[dict]:
    return json.loads(text[text.index("<answer>") + 8 : text.index("</answer>")])


def test_the_group_is_looked_at_and_answered_off_its_crop_in_pixels():
    # The budget's region of the 400 x 200 source: scale sqrt(19200 / 80000) = 0.4899, 195.96 x 97.98. The group
    # spans (100, 100)..(168, 144); with a 0.1 margin (93.2, 95.6, 174.8, 148.4), centre (134, 122), grown to
    # 195.96 x 97.98: (36.02, 73.01, 231.98, 170.99); half of it in the 200 x 100 image: [18, 37, 116, 85], back in
    # source (36, 74, 232, 170), 196 x 96. Shown within 19200 pixels in 32-multiples: 192 x 96, so
    # x_crop = 192 / 196 (x - 36), y_crop = y - 74.
    t = zoom_target(make_target(PEOPLE, "absolute"), **BUDGET)
    assert (
        t.look_text == "<think>4 persons, 3 in 1 crowded regions.</think>\n<look>[[18, 37, 116, 85]]</look>"
    )
    assert [c.box for c in t.crops] == [(36.0, 74.0, 232.0, 170.0)] and t.crops[0].size == (192, 96)
    assert answer_of(t.answer_text) == [
        {
            "region": 1,
            "bbox_2d": [63, 26, 82, 66],
            "label": "person",
        },  # 64 * 192 / 196 = 62.7, 84 * .. = 82.3
        {"region": 1, "bbox_2d": [86, 26, 106, 66], "label": "person"},  # 88 -> 86.2, 108 -> 105.8
        {"region": 1, "bbox_2d": [110, 30, 129, 70], "label": "person"},  # 112 -> 109.7, 132 -> 129.3
        {
            "bbox_2d": [150, 10, 160, 30],
            "label": "person",
        },  # outside the crop: the image frame, half of source
    ]
    assert t.answer_text.startswith("\n<answer>") and t.text == t.look_text + t.answer_text
    # the text look writes the same think and look, then every box in the image frame, in target order
    plain = parse_completion(t.text_look)
    assert t.text_look.startswith(t.look_text) and plain.regions in (None, [None] * 4)
    assert plain.answer.tolist() == [[50, 50, 60, 70], [62, 50, 72, 70], [150, 10, 160, 30], [74, 52, 84, 72]]


def test_the_group_is_answered_in_thousandths_of_its_crop():
    # 0..1000 of the image: x 2.5 / px, y 5 / px; the region (36.02, 73.01, 231.98, 170.99) is written
    # [90, 365, 580, 855], source (36, 73, 232, 171), 196 x 98: x_crop = (x - 36) / 0.196, y_crop = (y - 73) / 0.098.
    t = zoom_target(make_target(PEOPLE, "relative-1000"), **BUDGET)
    assert t.look_text.endswith("<look>[[90, 365, 580, 855]]</look>")
    assert [pytest.approx(c.box) for c in t.crops] == [(36.0, 73.0, 232.0, 171.0)]
    assert [(o.get("region"), o["bbox_2d"]) for o in answer_of(t.answer_text)] == [
        (
            1,
            [327, 276, 429, 684],
        ),  # 64 / 0.196 = 326.5, 27 / 0.098 = 275.5, 84 / .196 = 428.6, 67 / .098 = 683.7
        (1, [449, 276, 551, 684]),
        (1, [571, 316, 673, 724]),
        (None, [750, 100, 800, 300]),
    ]


def test_a_crowd_crop_is_shown_as_the_full_view_is():
    # A 320 x 240 source within 22000 pixels: the full view is 160 x 128, and so is every crop the rule opens, at
    # the source's own resolution (the region holds at least the budget's pixels).
    budget = {"factor": 32, "min_pixels": 1024, "max_pixels": 22000}
    rng = random.Random(0)
    for _ in range(30):
        rows = []
        for _ in range(rng.randint(3, 10)):
            x, y = rng.random() * 290, rng.random() * 180
            rows.append([x, y, x + 12 + rng.random() * 18, y + 30 + rng.random() * 30])
        target = make_target(torch.tensor(rows), "relative-1000", orig=(320, 240), resized=(160, 128))
        for crop in zoom_target(target, rng=rng, **budget).crops:
            w, h = crop.box[2] - crop.box[0], crop.box[3] - crop.box[1]
            assert (
                crop.size == (160, 128) and w >= 170 and h >= 127 and w / h == pytest.approx(4 / 3, abs=0.02)
            )


@pytest.mark.parametrize("coordinates", ["absolute", "relative-1000"])
def test_the_crops_are_the_rollouts_and_the_answer_resolves_to_the_ground_truth(coordinates):
    rng = random.Random(0)
    for _ in range(20):
        # Two crowds of 2-4 and a few stragglers on a 640 x 480 source shown at 320 x 224.
        rows = []
        for cx, cy in ((100 + rng.random() * 100, 100 + rng.random() * 50), (450, 350)):
            for k in range(rng.randint(2, 4)):
                x, y = cx + 22 * k + rng.random() * 4, cy + rng.random() * 8
                rows.append([x, y, x + 20, y + 45])
        rows += [[rng.random() * 600, rng.random() * 420, 0, 0] for _ in range(rng.randint(0, 2))]
        rows = [[x1, y1, x2 or x1 + 15, y2 or y1 + 40] for x1, y1, x2, y2 in rows]
        target = make_target(torch.tensor(rows), coordinates, orig=(640, 480), resized=(320, 224))
        t = zoom_target(target, rng=random.Random(1), **BUDGET)
        look = parse_completion(t.look_text).look  # what the rollout parses once </look> is written
        assert t.crops == crop_regions(look, target, max_looks=2, min_side=32, **BUDGET)
        assert 1 <= len(t.crops) <= 2
        parsed = parse_completion(t.text)
        assert parsed.well_formed and {r for r in parsed.regions} - {None} <= set(range(1, len(t.crops) + 1))
        resolved = resolve_regions(parsed, t.crops)
        assert resolved.well_formed and len(resolved.answer) == len(rows)
        # Every person back in the image frame, within the rounding (half a unit) of the frame it was written in.
        units = [c.to_image(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))[0] for c in t.crops]
        tolerance = 0.5 * max([1.0] + [max(float(u[2] - u[0]), float(u[3] - u[1])) for u in units]) + 1e-3
        for row in target["boxes"]:
            assert (resolved.answer - row).abs().max(1).values.min() <= tolerance


def test_sparse_scenes_get_no_look_and_the_image_frame():
    alone = torch.tensor([[10.0, 10, 20, 30], [200, 50, 210, 70], [300, 120, 310, 140]])
    t = zoom_target(make_target(alone, "absolute"), **BUDGET)
    assert t.look_text == "<think>3 persons, none crowded.</think>\n<look>[]</look>" and t.crops == []
    assert all("region" not in o for o in answer_of(t.answer_text))
    empty = zoom_target(make_target(torch.zeros(0, 4), "absolute"), **BUDGET)
    assert empty.text == "<think>0 objects, none crowded.</think>\n<look>[]</look>\n<answer>[]</answer>"


def test_groups_too_large_to_magnify_or_overlapping_are_not_looked_at():
    big = torch.tensor([[0.0, 0, 150, 190], [160, 0, 310, 190]])  # together most of the image
    assert dense_regions(big, (400, 200), max_looks=2) == []
    # Two pairs of 22 x 20: a 0.1 margin is 2.2 x 2.0, 26.4 x 24, widened to the image's 2:1, 48 x 24, about the
    # centre (shifted inside the image).
    two = torch.tensor([[10.0, 10, 20, 30], [22, 10, 32, 30], [300, 100, 310, 120], [312, 100, 322, 120]])
    first, second = dense_regions(two, (400, 200), max_looks=2)
    assert first == pytest.approx((0.0, 8.0, 48.0, 32.0))
    assert second == pytest.approx((287.0, 98.0, 335.0, 122.0))
    assert len(dense_regions(two, (400, 200), max_looks=1)) == 1
    # Five in a row, 12 apart: the second's reach (12..42) holds the first three, region x 3..51; the last two
    # then make a region x 33..81 that overlaps it: not looked at.
    row = torch.tensor([[10.0 + 12 * k, 10, 20 + 12 * k, 30] for k in range(5)])
    assert dense_regions(row, (400, 200), max_looks=2) == [pytest.approx((3.0, 8.0, 51.0, 32.0))]
    # A region of the budget's size on a source no larger than it: the whole image, more than half: no look.
    assert dense_regions(two, (400, 200), max_looks=2, min_size=(400, 200)) == []


def test_the_margin_is_drawn_from_rng_and_repeats_with_its_seed():
    one = dense_regions(PEOPLE, (400, 200), max_looks=2, rng=random.Random(3))
    assert one == dense_regions(PEOPLE, (400, 200), max_looks=2, rng=random.Random(3))
    # The group spans x 100..168, y 100..144; with margin m it is 44 (1 + 2m) high, widened to 88 (1 + 2m).
    (x1, _, x2, _), margin = one[0], (one[0][3] - 144) / 44
    assert 0.05 <= margin <= 0.25
    assert x1 == pytest.approx(134 - 44 * (1 + 2 * margin)) and x2 - x1 == pytest.approx(
        88 * (1 + 2 * margin)
    )


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.sampled_from(["absolute", "relative-1000"]),
    st.tuples(st.integers(16, 3000), st.integers(16, 3000)),
    st.lists(
        st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0.002, 0.3), st.floats(0.002, 0.3)), max_size=12
    ),
    st.integers(0, 3),
)
def test_any_scene_gives_a_well_formed_target_whose_regions_name_its_crops(coordinates, size, people, seed):
    w, h = size
    rows = [[x * w, y * h, min(w, (x + dw) * w), min(h, (y + dh) * h)] for x, y, dw, dh in people]
    rows = [r for r in rows if r[2] - r[0] >= 1 and r[3] - r[1] >= 1]
    resized = smart_resize(h, w, 32, 1024, 160 * 120)[::-1]
    target = make_target(torch.tensor(rows).reshape(-1, 4), coordinates, orig=size, resized=resized)
    t = zoom_target(target, rng=random.Random(seed), **BUDGET)
    parsed = parse_completion(t.text)
    assert parsed.well_formed and len(t.crops) <= 2
    resolved = resolve_regions(parsed, t.crops)
    assert resolved.well_formed and torch.isfinite(resolved.answer).all()


def test_a_crop_budget_larger_than_the_prompts_magnifies_past_the_source():
    # The region holds the prompt's budget (its "resize"), not the crop's: with a crop budget four times the
    # prompt's, a region of the 320 x 240 source of 171 x 128 is shown at 320 x 256, twice the source.
    target = make_target(
        torch.tensor([[100.0, 100, 120, 140], [124, 100, 144, 140]]), "relative-1000", (320, 240)
    )
    target["resize"] = (32, 1024, 22000)
    (crop,) = zoom_target(target, factor=32, min_pixels=1024, max_pixels=4 * 22000).crops
    w, h = crop.box[2] - crop.box[0], crop.box[3] - crop.box[1]
    assert 170 <= w <= 173 and 127 <= h <= 130 and crop.size == (320, 256)
    # Without a prompt budget the crop's stands for it: the region is then the whole image, so no look.
    del target["resize"]
    assert zoom_target(target, factor=32, min_pixels=1024, max_pixels=4 * 22000).crops == []
