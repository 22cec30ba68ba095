"""bench/zoom_reading.py: boxes read off a crop are told from image-frame boxes, and the script reports both looks."""

from __future__ import annotations

import pytest
import torch
from helpers import load_bench

from dip_r1.evaluation import Prediction
from dip_r1.rewards.parsing import parse_completion


def test_box_matches_splits_boxes_read_off_a_crop_from_the_others():
    text = (
        '<think>x</think><look>[[0, 0, 20, 20]]</look><answer>[{"region": 1, "bbox_2d": [0, 0, 10, 10]}, '
        '{"region": 1, "bbox_2d": [30, 30, 40, 40]}, {"bbox_2d": [50, 50, 60, 60]}]</answer>'
    )
    truth = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 62]])
    }  # the second: IoU 10/12 with the third
    p = Prediction(parse_completion(text), torch.zeros(3), torch.zeros(3, 4), torch.zeros(0, 4), truth)
    assert load_bench("zoom_reading").box_matches([p]) == {"region": [1, 2], "image": [1, 1]}


def test_zoom_reading_reports_both_looks(tiny_checkpoint, tmp_path, capsys):
    bench = load_bench("zoom_reading")
    try:
        out = bench.main(
            [
                "--model",
                tiny_checkpoint("qwen3_vl"),
                "--n",
                "1",
                "--max-new-tokens",
                "6",
                "--cache",
                str(tmp_path),
                "--seed",
                "3000",
            ]
        )
    finally:  # the bench flushes subnormal floats process-wide
        torch.set_flush_denormal(False)
    assert set(out) >= {"few/zoom", "few/text", "crowd/zoom", "crowd/text", "seconds"}
    # --seed draws both sets from other seeds than the default validation sets (1000, 1001)
    assert sorted(d.name.rsplit("-", 1)[1] for d in tmp_path.iterdir()) == ["s3000", "s3001"]
    assert out["crowd/text"]["crops_per_image"] == 0 and "region_box_precision" in out["crowd/zoom"]
    assert capsys.readouterr().out.strip().startswith("{")


def test_duplicate_share_counts_boxes_that_repeat_an_earlier_one():
    # Three boxes: the second repeats the first (IoU 100/110 = 0.91), the third stands alone.
    text = '<think>x</think><look>[]</look><answer>[{"bbox_2d": [0, 0, 10, 10]}, {"bbox_2d": [0, 0, 10, 11]}, {"bbox_2d": [50, 50, 60, 60]}]</answer>'
    p = Prediction(
        parse_completion(text),
        torch.zeros(3),
        torch.zeros(3, 4),
        torch.zeros(0, 4),
        {"boxes": torch.zeros(0, 4)},
    )
    assert load_bench("zoom_reading").duplicate_share([p]) == 1 / 3


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--size", "320by240"], "--size must be WIDTHxHEIGHT"),
        (["--model", "nowhere"], "--model nowhere holds no checkpoint"),
        (["--zoom-max-pixels", "0"], "--zoom-max-pixels must be at least 1"),
        (["--figure-scale", "3"], "--figure-scale must lie in (0, 2]"),
        (["--groups", "-1"], "--groups must be >= 0"),
        (["--seed", "-1"], "--seed must be at least 0"),
    ],
)
def test_zoom_reading_refuses_a_bad_flag_in_one_line(tiny_checkpoint, capsys, flags, says):
    argv = ["--model", tiny_checkpoint("qwen3_vl"), *flags]
    with pytest.raises(SystemExit):
        load_bench("zoom_reading").main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1]
