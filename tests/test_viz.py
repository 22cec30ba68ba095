"""Pictures: the expected size, and the expected colours where the boxes are."""

from __future__ import annotations

import io

import torch
from PIL import Image

from dip_r1 import viz
from dip_r1.zoom import CropGeometry

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


# Zoom: a 400 x 200 source shown at 200 x 100; two 100 x 100 crops, shaded so that an inset shows whose pixels it holds.
CROP_1 = CropGeometry((20.0, 20.0, 120.0, 120.0), (64, 64), "absolute", (400, 200), (200, 100))
CROP_2 = CropGeometry((260.0, 0.0, 360.0, 100.0), (64, 64), "absolute", (400, 200), (200, 100))


def _zoom_source() -> Image.Image:
    source = Image.new("RGB", (400, 200), BLACK)
    source.paste((0, 0, 120), (20, 20, 120, 120))
    source.paste((120, 0, 0), (260, 0, 360, 100))
    return source


def test_each_crop_is_outlined_and_drawn_as_an_inset_with_the_boxes_read_off_it():
    image = Image.new("RGB", (200, 100), BLACK)
    # Image-frame boxes: source (40, 40, 80, 80) read off crop 1, (280, 20, 320, 60) off crop 2, one not.
    pred = torch.tensor([[20.0, 20, 40, 40], [140, 10, 160, 30], [170, 60, 190, 90]])
    out = _png_roundtrip(
        viz.draw_detections(
            image, pred, gt=pred, coord_size=(200, 100), width=1,
            crops=[CROP_1, CROP_2], source=_zoom_source(), regions=[1, 2, None],
        )
    )  # fmt: skip
    # The picture, then one row of two 50 x 50 insets (half its height) 4 pixels below it.
    assert out.size == (200, 100 + 4 + 50)
    px = out.load()
    assert px[10, 50] == viz.CROP and px[59, 50] == viz.CROP  # crop 1's outline: source / 2
    assert px[179, 30] == viz.CROP  # crop 2's right edge
    assert px[20, 30] == viz.TRUE and px[170, 75] == viz.TRUE  # the boxes on the picture, as without zoom
    first, second = (0, 104), (54, 104)
    assert px[first[0] + 40, first[1] + 40] == (0, 0, 120)  # crop 1's pixels, half size
    assert px[second[0] + 40, second[1] + 40] == (120, 0, 0)  # crop 2's
    # The box read off each crop, where it lies in it: source (40, 40)..(80, 80) of crop 1 is (10, 10)..(30, 30).
    assert px[first[0] + 10, first[1] + 20] == viz.TRUE and px[first[0] + 29, first[1] + 20] == viz.TRUE
    assert px[second[0] + 10, second[1] + 20] == viz.TRUE and px[second[0] + 20, second[1] + 29] == viz.TRUE
    assert px[first[0] + 20, first[1] + 20] == (0, 0, 120)  # inside the box: untouched
    assert (
        px[first[0], first[1] + 40] == viz.CROP and px[second[0] + 49, second[1] + 25] == viz.CROP
    )  # frames
    assert px[first[0] + 120, first[1] + 25] == (255, 255, 255)  # nothing past the insets
    # Text mode: the same picture as before.
    assert viz.draw_detections(image, pred, gt=pred, coord_size=(200, 100)).size == (200, 100)


def test_group_picture_shows_each_completions_crops_in_its_colour():
    image = Image.new("RGB", (200, 100), BLACK)
    answers = [torch.tensor([[20.0, 20, 40, 40]]), torch.tensor([[140.0, 10, 160, 30]])]
    out = _png_roundtrip(
        viz.draw_group(
            image, answers, [None, None], (200, 100), grid=10, width=1,
            crops=[[CROP_1], [CROP_2]], source=_zoom_source(), regions=[[1], [1]],
        )
    )  # fmt: skip
    assert out.size == (2 * 200 + 4, 100 + 4 + 50)
    px = out.load()
    assert px[10, 50] == viz.PALETTE[0] and px[179, 30] == viz.PALETTE[1]  # outlines on the left panel
    assert (
        px[10, 104 + 20] == viz.PALETTE[0] and px[54 + 10, 104 + 20] == viz.PALETTE[1]
    )  # boxes in the insets
    assert px[54 + 40, 104 + 40] == (120, 0, 0)
    without = viz.draw_group(image, answers, [None, None], (200, 100), crops=[[CROP_1], [CROP_2]])
    assert without.size == (2 * 200 + 4, 100)  # no source image: no inset


def test_prediction_writer_and_group_pictures_draw_the_crops_they_are_given(tmp_path):
    from types import SimpleNamespace

    from dip_r1.callbacks import GroupPictures, PredictionWriter
    from dip_r1.evaluation import Prediction
    from dip_r1.rewards import parse_completion
    from dip_r1.rollout import Rollout, RolloutRecord
    from dip_r1.zoom import resolve_regions

    text = (
        '<think>t</think>\n<look>[[10, 10, 60, 60]]</look>\n<answer>[{"region": 1, "bbox_2d": [13, 13, 38, 38], '
        '"label": "person"}, {"bbox_2d": [170, 60, 190, 90], "label": "person"}]</answer>'
    )
    parsed = resolve_regions(parse_completion(text), [CROP_1])  # (13..38 of 64) * 100 / 64 / 2 + 10: ~20..40
    target = {"boxes": torch.zeros(0, 4), "image_size": (200, 100), "image_id": "a", "dataset": "d"}
    image = Image.new("RGB", (200, 100), BLACK)
    prediction = Prediction(
        parsed, torch.zeros(2), parsed.answer, parsed.look, target, None, [CROP_1], _zoom_source()
    )
    writer = PredictionWriter(min_size=0)
    assert writer.render(prediction, image).size == (200, 154)
    text_mode = Prediction(parsed, torch.zeros(2), parsed.answer, parsed.look, target)
    assert writer.render(text_mode, image).size == (200, 100)

    rollout = Rollout(
        torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool),
        torch.zeros(2, dtype=torch.bool), crops=[[CROP_1], []],
    )  # fmt: skip
    record = RolloutRecord(
        0, 2, [text, text], [parsed, parsed], {}, [target], [image], rollout, [_zoom_source()]
    )
    pictures = GroupPictures(every_n_steps=1, min_size=0, out_dir=str(tmp_path))
    trainer = SimpleNamespace(is_global_zero=True, loggers=[])
    pictures.on_train_batch_end(trainer, SimpleNamespace(last_rollout=record), None, None, 0)
    (written,) = pictures.written
    with Image.open(written) as picture:
        assert picture.size == (2 * 200 + 4, 154)  # one inset: the first completion's crop
        assert picture.convert("RGB").getpixel((10, 104 + 20)) == viz.PALETTE[0]  # the box read off it
