"""Prompt building: Qwen's resize rule, coordinate conventions and their inverse, messages and targets."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dip_r1.data import (
    DetectionPromptBuilder,
    DetectionSample,
    format_answer,
    smart_resize,
    to_image_coords,
    to_model_coords,
)


def test_smart_resize_hand_numbers():
    # 480/28 = 17.14 -> 17 * 28 = 476; 640/28 = 22.86 -> 23 * 28 = 644; 476 * 644 is within the bounds.
    assert smart_resize(480, 640) == (476, 644)
    # 1092 x 1932 > 1003520 pixels: beta = sqrt(1080 * 1920 / 1003520) = 1.4375,
    # 1080 / 1.4375 / 28 = 26.8 -> 26 * 28 = 728; 1920 / 1.4375 / 28 = 47.7 -> 47 * 28 = 1316.
    assert smart_resize(1080, 1920) == (728, 1316)
    # 28 x 28 < 3136 pixels: beta = sqrt(3136 / 600) = 2.286, ceil(30 * 2.286 / 28) = 3, ceil(20 * 2.286 / 28) = 2.
    assert smart_resize(30, 20) == (84, 56)
    # the tiny processors' limit, 28 * 28 * 64 pixels: beta = sqrt(307200 / 50176) = 2.474,
    # 480 / 2.474 / 28 = 6.93 -> 168; 640 / 2.474 / 28 = 9.24 -> 252.
    assert smart_resize(480, 640, max_pixels=28 * 28 * 64) == (168, 252)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    rng = random.Random(0)
    for _ in range(500):
        h, w = rng.randint(1, 4000), rng.randint(1, 4000)
        if max(h, w) / min(h, w) > 200:
            continue
        limits = dict(factor=rng.choice([28, 32]), min_pixels=rng.choice([3136, 200_704]))
        limits["max_pixels"] = rng.choice([50_176, 1_003_520])
        assert smart_resize(h, w, **limits) == reference(h, w, **limits), (h, w, limits)


def _close(tensor: torch.Tensor, expected: list) -> bool:
    return torch.allclose(tensor, torch.tensor(expected), atol=1e-4)


def test_coordinates_hand_numbers():
    boxes = torch.tensor([[64.0, 48.0, 320.0, 240.0]])
    # absolute: x * 644 / 640 = x * 1.00625, y * 476 / 480 = y * 0.991667
    absolute = to_model_coords(boxes, (640, 480), (644, 476), "absolute")
    assert _close(absolute, [[64.4, 47.6, 322.0, 238.0]])
    relative = to_model_coords(boxes, (640, 480), (644, 476), "relative-1000")
    assert relative.tolist() == [[100.0, 100.0, 500.0, 500.0]]
    assert to_image_coords(relative, (640, 480), (644, 476), "relative-1000").tolist() == boxes.tolist()
    back = to_image_coords(absolute, (640, 480), (644, 476), "absolute")
    assert _close(back, boxes.tolist())
    assert to_model_coords(torch.zeros(0, 4), (640, 480), (644, 476), "absolute").shape == (0, 4)
    with pytest.raises(ValueError, match="coordinates"):
        to_model_coords(boxes, (640, 480), (644, 476), "normalized")


sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


@settings(max_examples=60, deadline=None)
@given(
    orig=sizes,
    resized=sizes,
    coordinates=st.sampled_from(["absolute", "relative-1000"]),
    values=st.lists(st.floats(0, 5000), min_size=4, max_size=4 * 6).filter(lambda v: len(v) % 4 == 0),
)
def test_coordinates_round_trip(orig, resized, coordinates, values):
    boxes = torch.tensor(values, dtype=torch.float32).reshape(-1, 4)
    there = to_model_coords(boxes, orig, resized, coordinates)
    back = to_image_coords(there, orig, resized, coordinates)
    assert torch.allclose(back, boxes, rtol=1e-5, atol=1e-3)


def _sample(**kwargs) -> DetectionSample:
    fields = dict(
        image_id="img1",
        image_path="unused.jpg",
        width=640,
        height=480,
        boxes=[[64.0, 48.0, 320.0, 240.0], [0.0, 0.0, 64.0, 96.0], [320.0, 240.0, 640.0, 480.0]],
        labels=["person", "car", "person"],
        ignore=[[0.0, 240.0, 320.0, 480.0]],
    )
    fields.update(kwargs)
    return DetectionSample(**fields)


def test_build_absolute():
    prompt = DetectionPromptBuilder().build(_sample(), Image.new("RGB", (640, 480)), dataset="crowd")
    assert prompt.image.size == (644, 476)
    target = prompt.target
    # the most common label is the category; the car is not a target of "Detect every person"
    assert target["category"] == "person" and target["labels"] == ["person", "person"]
    assert target["boxes"].dtype == torch.float32
    assert _close(target["boxes"], [[64.4, 47.6, 322.0, 238.0], [322.0, 238.0, 644.0, 476.0]])
    assert _close(target["ignore"], [[0.0, 238.0, 322.0, 476.0]])
    assert target["image_size"] == (644, 476) and target["orig_size"] == (640, 480)
    assert (target["image_id"], target["dataset"]) == ("img1", "crowd")
    system, user = prompt.messages
    assert system["role"] == "system" and "<look>" in system["content"][0]["text"]
    assert user["role"] == "user" and user["content"][0] == {"type": "image"}
    assert user["content"][1]["text"] == (
        "Detect every person in the image. Give each box in pixels of this 644x476 image."
    )


def test_build_relative_and_category():
    builder = DetectionPromptBuilder(
        coordinates="relative-1000", category="car", user_prompt="Find {category}s."
    )
    prompt = builder.build(_sample(), Image.new("RGB", (640, 480)))
    # 64 / 640 * 1000 = 100, 96 / 480 * 1000 = 200
    assert prompt.target["boxes"].tolist() == [[0.0, 0.0, 100.0, 200.0]]
    assert prompt.target["labels"] == ["car"] and prompt.target["image_size"] == (1000, 1000)
    assert prompt.messages[1]["content"][1]["text"] == "Find cars."
    unlabeled = DetectionPromptBuilder().build(
        _sample(boxes=[], labels=[], ignore=[]), Image.new("RGB", (64, 64))
    )
    assert unlabeled.target["category"] == "person" and unlabeled.target["boxes"].shape == (0, 4)
    # 64 -> 56 (multiple of 28), 56 * 56 = 3136 = min_pixels
    assert unlabeled.image.size == (56, 56)
    with pytest.warns(UserWarning, match="matches no label"):
        DetectionPromptBuilder(category="bus").build(_sample(), Image.new("RGB", (640, 480)))


class _ImageProcessor:
    size = {"shortest_edge": 4 * 28 * 28, "longest_edge": 64 * 28 * 28}
    patch_size = 16
    merge_size = 2


def test_configure_from_model_and_processor():
    builder = DetectionPromptBuilder(min_pixels=1000)
    builder.configure(coordinates="relative-1000", image_processor=_ImageProcessor())
    # the builder's own min_pixels stays; the missing max comes from the processor; factor = 16 * 2
    assert (builder.coordinates, builder.min_pixels, builder.max_pixels, builder.factor) == (
        "relative-1000",
        1000,
        64 * 28 * 28,
        32,
    )
    builder.configure(max_pixels=28 * 28 * 4, factor=28)
    # 640 x 480 within 3136 pixels: beta = sqrt(307200 / 3136) = 9.9, 480 / 9.9 / 28 = 1.7 -> 28, 640 -> 56
    assert builder.resized_size(640, 480) == (56, 28)
    with pytest.raises(ValueError, match="coordinates"):
        builder.configure(coordinates="pixels")


def test_answer_format_rounds_both_conventions():
    boxes = torch.tensor([[100.4, 99.5, 500.5, 501.6]])
    # round half to even: 99.5 -> 100, 500.5 -> 500
    assert format_answer(boxes, ["person"]) == '[{"bbox_2d": [100, 100, 500, 502], "label": "person"}]'


def test_each_family_round_trips_through_the_prompt_builder_and_its_processor(tiny_model):
    from dip_r1.models import FAMILIES, PolicySpec, load_processor

    processor = load_processor(tiny_model)
    spec = PolicySpec(tiny_model).data_spec(processor)
    assert spec["coordinates"] == FAMILIES[_model_type(tiny_model)].coordinates
    builder = DetectionPromptBuilder()
    builder.configure(**spec, image_processor=processor.image_processor)
    prompt = builder.build(_sample(), Image.new("RGB", (640, 480)))
    # the processor keeps the builder's resized image as it is: its patch grid spans exactly those pixels
    grid = processor.image_processor(images=[prompt.image], return_tensors="pt")["image_grid_thw"][0]
    patch = processor.image_processor.patch_size
    assert (int(grid[2]) * patch, int(grid[1]) * patch) == prompt.target["resized_size"]
    target = prompt.target
    back = to_image_coords(
        target["boxes"], target["orig_size"], target["resized_size"], target["coordinates"]
    )
    assert _close(back, [[64.0, 48.0, 320.0, 240.0], [320.0, 240.0, 640.0, 480.0]])


def _model_type(path) -> str:
    import json
    from pathlib import Path

    return json.loads((Path(path) / "config.json").read_text())["model_type"]
