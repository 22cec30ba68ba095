"""DetectionMetrics: hand-worked counts, COCO AP through faster-coco-eval, MR^-2, DDP reduction."""

import math

import numpy as np
import pytest
import torch

from dip_r1.metrics import DetectionMetrics, log_average_miss_rate

# Image A: four people, three found (IoU 1, .77, .58) and one false positive; image B: one person found,
# one detection inside an ignore region, one false positive.
PREDS = [
    {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 7.7], [44.2, 0, 50, 10], [100, 100, 110, 110]]),
        "scores": torch.tensor([0.9, 0.8, 0.3, 0.1]),
    },
    {
        "boxes": torch.tensor([[60.0, 60, 70, 70], [0, 0, 10, 10], [200, 200, 210, 210]]),
        "scores": torch.tensor([0.99, 0.5, 0.05]),
    },
]
TARGETS = [
    {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]])},
    {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "ignore": torch.tensor([[50.0, 50, 100, 100]])},
]
EXPECTED = {
    # IoU .5: TP 4 of 6 counted predictions (the one in the ignore region is not) and 5 people
    "precision": 4 / 6,
    "recall": 4 / 5,
    "f1": 2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5),  # 8/11
    # IoU .75: the .58 match is lost (and counted as a false positive)
    "precision@0.75": 3 / 6,
    "recall@0.75": 3 / 5,
    "f1@0.75": 6 / 11,
    "mean_iou": (1 + 0.77 + 0.58 + 1) / 4,
    "count_mae": (abs(4 - 4) + abs(2 - 1)) / 2,
    # COCO, by score: ignored .99 | TP .9 | .8 (TP for IoU <= .77) | TP .5 | .3 (TP for IoU <= .58) | FP | FP.
    # AP50: recall .8 at precision 1 -> 81 of the 101 recall points.
    "ap50": 81 / 101,
    # AP at IoU .5, .55: 81/101; .6-.75: recall .6 at precision 1, 61/101; .8-.95: recall .2 at
    # precision 1 then .4 at 2/3: (21 + 20 * 2/3) / 101. Mean of the ten: 163/303.
    "ap": (2 * 81 / 101 + 4 * 61 / 101 + 4 * (21 + 40 / 3) / 101) / 10,
    # four TPs before the first FP: the miss rate is 1 - 4/5 at every FPPI reference
    "mr2": 0.2,
}


def assert_expected(out, expected=EXPECTED):
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, abs=1e-5), key


def test_hand_worked_batch():
    metric = DetectionMetrics(iou_thresholds=[0.5, 0.75])
    metric.update(PREDS, TARGETS)
    out = metric.compute()
    assert_expected(out)
    assert out["f1@0.5"].item() == pytest.approx(8 / 11)


def test_updates_accumulate_and_reset():
    metric = DetectionMetrics()
    metric.update(PREDS[:1], TARGETS[:1])
    metric.update(PREDS[1:], TARGETS[1:])
    assert_expected(metric.compute())
    metric.reset()
    metric.update(PREDS[1:], TARGETS[1:])
    assert metric.compute()["precision"].item() == 0.5  # image B alone: 1 TP of 2 counted


def test_without_scores_there_is_no_ranking_metric():
    metric = DetectionMetrics()
    metric.update([{"boxes": p["boxes"]} for p in PREDS], TARGETS)
    out = metric.compute()
    assert not {"ap", "ap50", "mr2"} & set(out)
    assert_expected(out, {k: EXPECTED[k] for k in ("precision", "recall", "f1", "count_mae")})


def test_matching_is_the_rewards_hungarian_one():
    gt = torch.tensor([[0.0, 0, 10, 10], [4, 0, 14, 10]])
    pred = torch.tensor([[1.0, 0, 11, 10], [0, 0, 8, 10]])  # greedy would find one pair, Hungarian two
    metric = DetectionMetrics()
    metric.update([{"boxes": pred}], [{"boxes": gt}])
    assert metric.compute()["recall"].item() == 1.0


def test_merge_and_ddp_sync_reduce_over_ranks():
    a, b = DetectionMetrics(), DetectionMetrics()
    a.update(PREDS[:1], TARGETS[:1])
    b.update(PREDS[1:], TARGETS[1:])
    a.merge_state(b)
    assert_expected(a.compute())
    # Two ranks holding the same two images: "cat" joins the flattened per-image states into one
    # tensor each, which compute() must split again; every ratio is unchanged.
    twin = DetectionMetrics(dist_sync_fn=lambda t, group=None: [t, t], distributed_available_fn=lambda: True)
    twin.update(PREDS, TARGETS)
    assert_expected(twin.compute())


def test_empty_images():
    metric = DetectionMetrics()
    metric.update(
        [{"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0)}], [{"boxes": torch.zeros((0, 4))}]
    )
    out = metric.compute()
    assert (out["precision"].item(), out["recall"].item(), out["count_mae"].item()) == (0.0, 0.0, 0.0)
    assert math.isnan(out["ap"].item()) and math.isnan(out["mr2"].item())  # undefined without people
    with pytest.raises(ValueError):
        DetectionMetrics(iou_thresholds=[0.0])
    with pytest.raises(ValueError):
        metric.update(
            [{"boxes": torch.zeros((2, 4)), "scores": torch.zeros(3)}], [{"boxes": torch.zeros((0, 4))}]
        )


def test_log_average_miss_rate_conventions():
    gt = np.array([[0.0, 0, 10, 10]])
    # FP (.9) then TP (.5) on one image: FPPI 1 for both points. Below FPPI 1 the curve has no point:
    # miss rate 1 (Caltech); at FPPI 1 the miss rate is 0, floored at 1e-10 -> (1e-10)^(1/9).
    dets = np.array([[50.0, 50, 60, 60], [0, 0, 10, 10]])
    assert log_average_miss_rate([(dets, np.array([0.9, 0.5]), gt, np.zeros((0, 4)))]) == pytest.approx(
        10 ** (-10 / 9)
    )
    # the same false positive inside an ignore region does not count: miss rate 0 everywhere
    ignore = np.array([[45.0, 45, 65, 65]])
    assert log_average_miss_rate([(dets, np.array([0.9, 0.5]), gt, ignore)]) == pytest.approx(1e-10)
    # greedy by score: the higher-scored of two detections of one person is the TP, the lower the FP
    # (the other way round the FP would come first and give (1e-10)^(1/9) as above)
    two = np.array([[0.0, 0, 10, 10], [0, 0, 10, 9]])
    assert log_average_miss_rate([(two, np.array([0.2, 0.8]), gt, np.zeros((0, 4)))]) == pytest.approx(1e-10)
