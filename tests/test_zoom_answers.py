"""resolve_regions: boxes read off a crop back in the image frame, hand-worked for both coordinate conventions."""

import json

import pytest
import torch

from dip_r1.rewards import parse_completion
from dip_r1.zoom import CropGeometry, crop_regions, resolve_regions


def completion(objects: list[dict], look: list | None = None) -> str:
    return f"<think>x</think>\n<look>{json.dumps(look or [])}</look>\n<answer>{json.dumps(objects)}</answer>"


# Source 400 x 200; the crop is its pixels (100, 50)..(300, 150), 200 x 100.
RELATIVE = CropGeometry(
    box=(100.0, 50.0, 300.0, 150.0),
    size=(64, 32),
    coordinates="relative-1000",
    orig_size=(400, 200),
    resized_size=(160, 80),
)
ABSOLUTE = CropGeometry(  # the prompt image is shown at half size, the crop at twice its size
    box=(100.0, 50.0, 300.0, 150.0),
    size=(400, 200),
    coordinates="absolute",
    orig_size=(400, 200),
    resized_size=(200, 100),
)


@pytest.mark.parametrize(
    "crop, box, expected",
    [
        # 0..1000 of the crop -> source (150, 100, 250, 150) -> 0..1000 of the image
        (RELATIVE, [250, 500, 750, 1000], [375.0, 500.0, 625.0, 750.0]),
        # pixels of the 400 x 200 crop -> source (150, 75, 250, 125) -> pixels of the 200 x 100 image
        (ABSOLUTE, [100, 50, 300, 150], [75.0, 37.5, 125.0, 62.5]),
    ],
    ids=["relative-1000", "absolute"],
)
def test_a_region_box_is_mapped_to_the_image_frame_and_others_are_left(crop, box, expected):
    text = completion([{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"region": 1, "bbox_2d": box, "label": "b"}])
    parsed = parse_completion(text)
    resolved = resolve_regions(parsed, [crop])
    assert resolved.well_formed and resolved.labels == ["a", "b"] and resolved.regions == [None, 1]
    assert resolved.answer.tolist() == [[1.0, 2.0, 3.0, 4.0], expected]
    assert resolved.answer_spans == parsed.answer_spans
    assert parsed.answer[1].tolist() == [float(v) for v in box]  # the parsed record is not changed


def test_crops_opened_by_crop_regions_map_back_for_each_family():
    # Qwen2.5-VL: a 640 x 480 source shown at 320 x 240. The look box (40, 30, 80, 60) is source (80, 60, 160, 120),
    # 80 x 60, shown 4x larger then fitted to 32-multiples within 76800 pixels: 320 x 224.
    absolute = {"orig_size": (640, 480), "resized_size": (320, 240), "coordinates": "absolute"}
    look = torch.tensor([[40.0, 30.0, 80.0, 60.0]])
    (crop,) = crop_regions(
        look, absolute, max_looks=2, min_side=32, factor=32, min_pixels=1024, max_pixels=76800
    )
    assert crop.box == (80.0, 60.0, 160.0, 120.0) and crop.size == (320, 224)
    # (80, 56, 240, 168) of the crop -> source (100, 75, 140, 105) -> image pixels (50, 37.5, 70, 52.5)
    objects = [{"region": 1, "bbox_2d": [80, 56, 240, 168]}, {"region": 1, "bbox_2d": [0, 0, 320, 224]}]
    resolved = resolve_regions(parse_completion(completion(objects, look.tolist())), [crop])
    assert torch.allclose(resolved.answer, torch.tensor([[50.0, 37.5, 70.0, 52.5], [40.0, 30.0, 80.0, 60.0]]))

    # Qwen2-VL / Qwen3-VL / Qwen3.5: (100, 100, 300, 300) of 0..1000 is source (64, 48, 192, 144);
    # (250, 250, 750, 750) of the crop -> source (96, 72, 160, 120) -> (150, 150, 250, 250) of the image.
    relative = {"orig_size": (640, 480), "resized_size": (320, 240), "coordinates": "relative-1000"}
    look = torch.tensor([[100.0, 100.0, 300.0, 300.0]])
    (crop,) = crop_regions(
        look, relative, max_looks=2, min_side=32, factor=32, min_pixels=1024, max_pixels=76800
    )
    assert crop.box == (64.0, 48.0, 192.0, 144.0)
    resolved = resolve_regions(
        parse_completion(completion([{"region": 1, "bbox_2d": [250, 250, 750, 750]}])), [crop]
    )
    assert torch.allclose(resolved.answer, torch.tensor([[150.0, 150.0, 250.0, 250.0]]))


def test_a_region_that_opened_no_crop_drops_the_box_as_a_format_error():
    objects = [
        {"region": 2, "bbox_2d": [0, 0, 500, 500], "label": "two"},  # one crop only
        {"bbox_2d": [1, 1, 9, 9], "label": "plain"},
        {"region": 0, "bbox_2d": [0, 0, 500, 500], "label": "zero"},
        {"region": -1, "bbox_2d": [0, 0, 500, 500], "label": "negative"},
        {"region": "1", "bbox_2d": [0, 0, 500, 500], "label": "string"},
        {"region": 1, "bbox_2d": [0, 0, 500, 500], "label": "one"},
    ]
    parsed = parse_completion(completion(objects))
    assert parsed.well_formed
    resolved = resolve_regions(parsed, [RELATIVE])
    assert not resolved.well_formed
    assert resolved.labels == ["plain", "one"] and resolved.regions == [None, 1]
    assert resolved.answer.tolist() == [[1.0, 1.0, 9.0, 9.0], [250.0, 250.0, 500.0, 500.0]]
    assert resolved.answer_spans == [parsed.answer_spans[1], parsed.answer_spans[5]]
    # Text mode shows no crop: any region names none.
    text_mode = resolve_regions(parsed, [])
    assert not text_mode.well_formed and text_mode.labels == ["plain"] and text_mode.regions == [None]


def test_without_regions_the_record_is_unchanged():
    parsed = parse_completion(completion([{"bbox_2d": [1, 1, 9, 9], "label": "p"}]))
    assert resolve_regions(parsed, []) is parsed and resolve_regions(parsed, [RELATIVE]) is parsed
    empty = parse_completion("<think>x</think>")
    assert resolve_regions(empty, [RELATIVE]) is empty and empty.answer is None


def test_a_box_that_overflows_in_the_image_frame_is_dropped_without_a_format_error():
    tiny = CropGeometry(box=(0.0, 0.0, 1e9, 1e9), size=(32, 32), coordinates="absolute",
                        orig_size=(10, 10), resized_size=(10, 10))  # fmt: skip
    parsed = parse_completion(
        completion([{"region": 1, "bbox_2d": [0, 0, 1e33, 1e33]}, {"bbox_2d": [1, 1, 2, 2]}])
    )
    resolved = resolve_regions(parsed, [tiny])
    assert (
        resolved.well_formed
        and resolved.answer.tolist() == [[1.0, 1.0, 2.0, 2.0]]
        and resolved.regions == [None]
    )


def test_a_prediction_with_crops_moves_between_devices_as_lightning_moves_it():
    # trainer.predict moves each step's predictions to the CPU, rebuilding every dataclass inside them
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from dip_r1.evaluation import Prediction
    from dip_r1.rewards.parsing import parse_completion

    crop = CropGeometry((100.0, 50.0, 300.0, 150.0), (64, 32), "relative-1000", (400, 200), (160, 80))
    parsed = parse_completion("<think>x</think><look>[[250, 250, 750, 750]]</look><answer>[]</answer>")
    p = Prediction(parsed, torch.zeros(0), torch.zeros(0, 4), torch.zeros(0, 4), {"boxes": torch.zeros(0, 4)})
    p.crops = [crop]
    moved = move_data_to_device([p], torch.device("cpu"))
    assert moved[0].crops == [crop]
