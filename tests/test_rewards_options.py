"""The detection reward's options: a penalty on repeated answer boxes and an IoU threshold that rises with the
step, worked by hand, through the suite and from YAML."""

from __future__ import annotations

import jsonargparse
import pytest
import torch

from dip_r1.rewards import PrecisionRecallReward, Ramp, RewardSuite, parse_completion
from dip_r1.rewards.functional import precision_recall_reward
from dip_r1.settings import SettingError

GT = torch.tensor([[0.0, 0, 10, 10], [20.0, 0, 30, 10]])


def test_repeated_boxes_lower_the_reward_by_hand():
    # A; a box inside A at IoU 0.69 (not a repeat); B; a box at IoU 0.9 with A (a repeat, and 0.77 with the second)
    pred = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 6.9], [20.0, 0, 30, 10], [0.0, 0, 10, 9]])
    # matched A and B: P = 2/4, R = 2/2, reward 0.75; repeats d = 1 of n = 4
    assert precision_recall_reward(pred, GT) == pytest.approx(0.75)
    assert precision_recall_reward(pred, GT, duplicate_penalty=0.5) == pytest.approx(0.75 * (1 - 0.5 / 4))
    assert precision_recall_reward(pred, GT, duplicate_penalty=1.0) == pytest.approx(0.75 * 3 / 4)
    # a looser duplicate_iou makes the 0.69 box a repeat too: d = 2
    assert precision_recall_reward(pred, GT, duplicate_penalty=1.0, duplicate_iou=0.6) == pytest.approx(
        0.75 / 2
    )
    # no repeats: no change; order matters only in which copy is the repeat
    assert precision_recall_reward(pred[[0, 2]], GT, duplicate_penalty=1.0) == 1.0
    assert precision_recall_reward(pred[[3, 0, 2]], GT, duplicate_penalty=1.0) == pytest.approx(
        (2 / 3 + 1) / 2 * (1 - 1 / 3)
    )


def completion(answer: str) -> str:
    return f"<think>t</think><look>[]</look><answer>{answer}</answer>"


def test_the_modular_reward_penalises_repeats():
    parsed = [parse_completion(completion("[[0, 0, 10, 10], [0, 0, 10, 9], [20, 0, 30, 10]]"))]
    target = [{"boxes": GT, "ignore": torch.zeros(0, 4), "image_size": (40, 20)}]
    # P 2/3, R 1 -> 5/6; one repeat of three boxes at penalty 0.6 -> x 0.8
    assert PrecisionRecallReward()(parsed, target, 1).tolist() == pytest.approx([5 / 6])
    assert PrecisionRecallReward(duplicate_penalty=0.6)(parsed, target, 1).tolist() == pytest.approx(
        [5 / 6 * 0.8]
    )


def test_iou_threshold_ramp_at_three_steps():
    # two answer boxes at IoU 0.55 and 0.8 with the two ground-truth boxes
    answer = "[[0, 0, 10, 5.5], [20, 0, 30, 8]]"
    parsed = [parse_completion(completion(answer))]
    target = [{"boxes": GT, "ignore": torch.zeros(0, 4), "image_size": (40, 20)}]
    suite = RewardSuite({"accuracy": PrecisionRecallReward(iou_threshold=Ramp(0.5, 0.9, 100))})
    expected = {
        0: 1.0,  # threshold 0.5: both match
        50: 0.5,  # threshold 0.7: the 0.8 box only, P = R = 1/2
        150: 0.0,  # past the ramp, threshold 0.9: none
    }
    for step, value in expected.items():
        suite.set_step(step)
        assert suite(parsed, target, 1)["accuracy"].tolist() == pytest.approx([value]), step
    assert suite.rewards["accuracy"].step == 150
    assert [Ramp(0.5, 0.9, 100).at(s) for s in (0, 50, 150)] == pytest.approx([0.5, 0.7, 0.9])


def test_iou_threshold_from_yaml_a_number_or_a_ramp():
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(PrecisionRecallReward, "accuracy")
    ramp = parser.instantiate(
        parser.parse_string(
            "accuracy: {iou_threshold: {start: 0.5, end: 0.75, steps: 10}, duplicate_penalty: 0.5}"
        )
    ).accuracy
    assert ramp.iou_threshold == Ramp(0.5, 0.75, 10) and ramp.duplicate_penalty == 0.5
    fixed = parser.instantiate(parser.parse_string("accuracy: {iou_threshold: 0.6}")).accuracy
    assert fixed.iou_threshold == 0.6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"duplicate_penalty": 1.5}, "duplicate_penalty must be in [0, 1], got 1.5"),
        ({"duplicate_iou": 0.0}, "duplicate_iou must be in (0, 1], got 0.0"),
        ({"iou_threshold": 1.2}, "iou_threshold must be in (0, 1], got 1.2"),
        ({"iou_threshold": Ramp(0.5, 1.2, 10)}, "iou_threshold.end must be in (0, 1], got 1.2"),
    ],
)
def test_bad_options_are_one_line(kwargs, message):
    with pytest.raises(SettingError) as error:
        PrecisionRecallReward(**kwargs)
    assert str(error.value) == message
    with pytest.raises(SettingError, match="steps must be >= 1, got 0"):
        Ramp(0.5, 0.7, 0)
