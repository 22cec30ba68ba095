"""Pictures: the expected size, and the expected colours where the boxes are."""

from __future__ import annotations

import io

import torch
from PIL import Image

from dip_r1 import viz

BLACK = (0, 0, 0)


def _png_roundtrip(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_detections_with_ground_truth_colour_true_false_missed_and_look():
    image = Image.new("RGB", (100, 80), BLACK)
    pred = torch.tensor([[10.0, 10, 40, 40], [60, 10, 90, 40]])  # the first matches, the second is false
    gt = torch.tensor([[10.0, 10, 40, 40], [10, 50, 40, 75]])  # the second is missed
    look = torch.tensor([[50.0, 45, 95, 78]])
    out = _png_roundtrip(viz.draw_detections(image, pred, gt=gt, look=look, width=1))
    assert out.size == (100, 80)
    px = out.load()
    assert px[10, 25] == viz.TRUE and px[39, 25] == viz.TRUE  # left and right edges of the true box
    assert px[60, 25] == viz.FALSE and px[75, 10] == viz.FALSE
    assert px[10, 62] == viz.MISSED and px[25, 74] == viz.MISSED
    assert px[50, 45] == viz.LOOK and px[52, 45] == viz.LOOK  # the first dash: 5 pixels from the corner
    assert px[57, 45] == BLACK  # the gap after it
    assert px[25, 25] == BLACK and px[75, 60] == BLACK  # insides untouched


def test_predictions_alone_are_one_colour_and_scores_add_a_tag():
    image = Image.new("RGB", (100, 80), BLACK)
    pred = torch.tensor([[20.0, 30, 50, 60]])
    plain = _png_roundtrip(viz.draw_detections(image, pred, width=1))
    assert plain.load()[20, 45] == viz.PRED
    tagged = _png_roundtrip(viz.draw_detections(image, pred, torch.tensor([-0.1]), width=1))

    def count(img):
        return sum(1 for p in img.getdata() if p == viz.PRED)

    assert count(tagged) > count(plain) + 20  # the filled score tag above the box
    assert tagged.load()[20, 28] == viz.PRED  # the tag sits just above the top-left corner


def test_model_coordinates_are_scaled_and_small_images_enlarged():
    image = Image.new("RGB", (200, 100), BLACK)
    # relative-1000 [100, 100, 500, 500] on 200 x 100 is [20, 10, 100, 50] pixels; enlarged x2: [40, 20, 200, 100]
    out = viz.draw_detections(
        image, torch.tensor([[100.0, 100, 500, 500]]), coord_size=(1000, 1000), width=1, min_size=200
    )
    assert out.size == (400, 200)
    px = out.load()
    assert px[40, 60] == viz.PRED and px[199, 60] == viz.PRED and px[100, 20] == viz.PRED
    assert px[39, 60] == BLACK


def test_group_variance_is_p_times_one_minus_p():
    answers = [
        torch.tensor([[0.0, 0, 2, 2]]),
        torch.tensor([[0.0, 0, 4, 2]]),
        None,
        torch.tensor([[0.0, 0, 2, 4]]),
    ]
    u = viz.group_variance(answers, (4, 4), grid=2)
    # cell (0, 0): covered by 3 of 4 -> 3/16; (0, 1) [row 0, column 1]: 1 of 4 -> 3/16; (1, 0): 1 of 4; (1, 1): none
    torch.testing.assert_close(u, torch.tensor([[3 / 16, 3 / 16], [3 / 16, 0.0]], dtype=torch.float64))


def test_group_picture_has_two_panels_heat_where_answers_disagree_and_dashed_looks():
    image = Image.new("RGB", (100, 80), (128, 128, 128))
    answers = [torch.tensor([[0.0, 0, 50, 80]]), None]  # they disagree on the left half only
    looks = [torch.tensor([[60.0, 10, 90, 70]]), None]
    out = _png_roundtrip(viz.draw_group(image, answers, looks, (100, 80), grid=10, width=1))
    assert out.size == (2 * 100 + 4, 80)
    px = out.load()
    assert px[0, 40] == viz.PALETTE[0]  # the first completion's answer, left panel
    r, g, b = px[104 + 25, 40]  # right panel, left half: hot
    assert r > 150 and g < 80 and b < 80
    r, g, b = px[104 + 75, 75]  # right panel, right half: the dimmed grey image
    assert r == g == b == 64
    assert px[104 + 60, 10] == viz.PALETTE[0]  # the look box, dashed, in the completion's colour
    assert px[104 + 66, 10] == (64, 64, 64)  # a gap of the dash
    assert px[102, 40] == (255, 255, 255)  # the gap between the panels
