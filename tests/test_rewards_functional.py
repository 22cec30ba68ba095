"""precision_recall_reward, match_boxes and look_reward: one hand-worked example per rule, and properties.

Boxes in the matching examples are 10 high and share y, so IoU is overlap / union along x.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dip_r1.rewards.functional import (
    inspection_accuracy,
    look_reward,
    look_terms,
    match_boxes,
    match_detections,
    precision_recall_reward,
    rasterize_boxes,
)


def strip(*spans):
    """Boxes ``[x1, 0, x2, 10]``."""
    return torch.tensor([[a, 0.0, b, 10.0] for a, b in spans])


# --- precision_recall_reward, rule by rule ---------------------------------------------------------


def test_rule1_unmatched_predictions_in_ignore_regions_are_not_counted():
    gt = torch.tensor([[0.0, 0, 10, 10]])
    ignore = torch.tensor([[100.0, 100, 200, 200]])
    pred = torch.tensor(
        [
            [0.0, 0, 10, 10],  # true positive
            [110.0, 110, 120, 120],  # inside the region (IoA 1): removed
            [150.0, 190, 170, 210],  # IoA 200 / 400 = 0.5: removed
            [150.0, 191, 170, 211],  # IoA 180 / 400 = 0.45: a false positive
            [300.0, 300, 310, 310],  # a false positive
        ]
    )
    # counted 3, TP 1: precision 1/3, recall 1 -> (1/3 + 1) / 2
    assert precision_recall_reward(pred, gt, ignore) == pytest.approx(2 / 3)
    assert precision_recall_reward(pred, gt) == pytest.approx((1 / 5 + 1) / 2)  # no regions: all count
    assert match_detections(pred, gt, ignore).num_pred == 3


def test_rule1_a_matched_prediction_in_an_ignore_region_stays_a_true_positive():
    gt = torch.tensor([[110.0, 110, 120, 120]])
    ignore = torch.tensor([[100.0, 100, 200, 200]])
    # the copy is unmatched and inside the region: removed, so precision stays 1/1
    assert precision_recall_reward(torch.cat([gt, gt]), gt, ignore) == 1.0
    assert precision_recall_reward(torch.cat([gt, gt]), gt) == 0.75  # precision 1/2, recall 1


def test_rule2_hungarian_not_greedy():
    gt = strip((0, 10), (4, 14))
    pred = strip((1, 11), (0, 8))
    # IoU: p0-g0 9/11 = .818, p0-g1 7/13 = .538, p1-g0 8/10 = .8, p1-g1 4/14 = .286.
    # Greedy keeps p0-g0 only (TP 1, reward .5); the assignment keeps p0-g1 + p1-g0 = 1.338.
    rows, cols = match_boxes(np.array([[9 / 11, 7 / 13], [0.8, 4 / 14]]))
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    assert precision_recall_reward(pred, gt) == 1.0
    # IoU-weighted: TP = 7/13 + 0.8 = 1.33846, precision = recall = 0.66923
    assert precision_recall_reward(pred, gt, iou_weighted=True) == pytest.approx((7 / 13 + 0.8) / 2)


def test_rule2_pairs_below_the_threshold_are_not_kept():
    gt, pred = strip((5, 15)), strip((0, 10))  # IoU 5 / 15 = 1/3
    assert precision_recall_reward(pred, gt) == 0.0
    assert precision_recall_reward(pred, gt, iou_threshold=0.3) == 1.0
    assert precision_recall_reward(strip((0, 10)), strip((0, 20))) == 1.0  # IoU exactly 0.5 is kept


def test_rule2_ties_prefer_more_pairs_whatever_the_order():
    # p0 = g0 (IoU 1); p0-g1 = 0.5, p1-g0 = 0.5: one pair of 1.0 ties two pairs of 0.5 + 0.5.
    gt, pred = strip((0, 10), (0, 20)), strip((0, 10), (0, 5))
    assert precision_recall_reward(pred, gt) == 1.0
    assert precision_recall_reward(pred.flip(0), gt) == 1.0


def test_rule3_empty_cases():
    empty = torch.zeros((0, 4))
    gt = strip((0, 10))
    assert precision_recall_reward(empty, empty) == 1.0  # nothing to find, nothing found
    assert precision_recall_reward(empty, gt) == 0.0  # missed everything
    assert precision_recall_reward(gt, empty) == 0.5  # precision 0, recall 1
    assert precision_recall_reward(gt, empty, precision_weight=0.8, recall_weight=0.2) == pytest.approx(0.2)
    assert precision_recall_reward(None, empty) == 0.0  # no parseable answer
    # predictions all in ignore regions count as no prediction
    assert precision_recall_reward(strip((0, 10)), empty, strip((0, 10))) == 1.0


def test_rule4_weights():
    gt, pred = strip((0, 10), (20, 30)), strip((0, 10))  # precision 1, recall 1/2
    assert precision_recall_reward(pred, gt) == 0.75
    assert precision_recall_reward(pred, gt, precision_weight=3, recall_weight=1) == 0.875  # (3 + .5) / 4
    assert precision_recall_reward(pred, gt, precision_weight=0, recall_weight=1) == 0.5
    with pytest.raises(ValueError):
        precision_recall_reward(pred, gt, precision_weight=0, recall_weight=0)


def test_match_boxes_solves_only_the_conflicting_part():
    iou = np.zeros((4, 4))
    iou[0, 0] = 0.9  # an isolated pair
    iou[1, 1], iou[1, 2], iou[2, 1] = 0.9, 0.6, 0.6  # a conflict: 0.6 + 0.6 beats 0.9
    iou[3, 3] = 0.4  # below the threshold
    rows, cols = match_boxes(iou)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 0), (1, 2), (2, 1)]


# --- look_reward ------------------------------------------------------------------------------------

# 4 x 4 image, grid 4: one cell per unit. Answers of the group of four:
ANSWERS = [
    torch.tensor([[0.0, 0, 2, 2]]),  # top-left quarter
    torch.tensor([[0.0, 0, 2, 2]]),
    torch.tensor([[0.0, 0, 4, 2]]),  # top half
    torch.tensor([[0.0, 0, 4, 4]]),  # everything
]
# p: top-left 4/4 (U = 0), top-right 2/4 (U = .25), bottom 1/4 (U = .1875); max U .25, sum U 2.5.
LOOKS = [
    torch.tensor([[2.0, 0, 4, 2]]),  # top-right: hit 1, focus 1/(4 * .25) = 1, coverage 1/2.5 = .4
    torch.tensor([[0.0, 0, 4, 4]]),  # all: hit 2.5, focus 2.5/(16 * .25) = .625, coverage 1
    torch.tensor([[0.0, 0, 2, 2]]),  # where the group agrees: 0
    None,  # no look: 0
]


def test_rule1_rasterisation_covers_cells_whose_centre_is_inside():
    cells = rasterize_boxes(
        [
            torch.tensor([[0.0, 0, 1, 1]]),
            torch.tensor([[0.6, 0.6, 1.4, 1.4]]),
            torch.tensor([[0.0, 0, 2, 1]]),
            None,
        ],
        (8, 4),  # cells 2 wide, 1 high: centres x = 1, 3, 5, 7 and y = .5, 1.5, 2.5, 3.5
        grid=4,
    )
    assert cells.sum((1, 2)).tolist() == [1, 0, 1, 0]  # (0,0) has centre (1, .5), on the first box's edge
    assert cells[0, 0, 0] and cells[2, 0, 0]
    many = rasterize_boxes(
        [torch.tensor([[0.0, 0, 1, 4], [3.0, 0, 4, 4], [-50.0, -50, -1, -1]])], (4, 4), grid=4
    )
    assert many[0].int().tolist() == [[1, 0, 0, 1]] * 4  # several boxes at once; outside the image: nothing


def test_rule2_3_look_reward_modes():
    f1 = look_reward(ANSWERS, LOOKS, (4, 4), grid=4)
    assert f1.dtype == torch.float32
    # f1: 2 * 1 * .4 / 1.4 = .571429; 2 * .625 * 1 / 1.625 = .769231
    assert f1.tolist() == pytest.approx([0.8 / 1.4, 1.25 / 1.625, 0.0, 0.0], abs=1e-6)
    focus, coverage = look_terms(ANSWERS, LOOKS, (4, 4), grid=4)
    assert focus.tolist() == pytest.approx([1, 0.625, 0, 0])
    assert coverage.tolist() == pytest.approx([0.4, 1, 0, 0])
    with pytest.raises(ValueError):
        look_reward(ANSWERS, LOOKS[:2], (4, 4))


def test_rule4_agreement_or_no_look_gives_zero():
    same = [torch.tensor([[0.0, 0, 2, 2]])] * 3
    assert look_reward(same, [torch.tensor([[0.0, 0, 4, 4]])] * 3, (4, 4), grid=4).tolist() == [0, 0, 0]
    assert look_reward([None, None], [torch.tensor([[0.0, 0, 4, 4]])] * 2, (4, 4), grid=4).tolist() == [0, 0]
    empty_look = [torch.zeros((0, 4))] * 4
    assert look_reward(ANSWERS, empty_look, (4, 4), grid=4).tolist() == [0, 0, 0, 0]


def test_inspection_accuracy_scores_the_answer_inside_the_looked_regions():
    gt = strip((0, 10), (20, 30), (40, 50))
    look = torch.tensor([[0.0, 0, 32, 10]])  # holds the centres of the first two objects (5, 25), not 45
    # Answer: the first object right, a made-up box at 12-18 (centre 15, inside), the third object (outside).
    answer = strip((0, 10), (12, 18), (40, 50))
    # Inside: 2 answers, 2 objects, 1 match: precision 1/2, recall 1/2.
    assert inspection_accuracy(answer, look, gt) == 0.5
    assert inspection_accuracy(strip((0, 10), (20, 30)), look, gt) == 1.0  # what lies outside never counts
    assert (
        inspection_accuracy(strip((40, 50)), torch.tensor([[60.0, 0, 70, 10]]), gt) == 1.0
    )  # empty, left empty
    assert inspection_accuracy(strip((60, 70)), torch.tensor([[60.0, 0, 70, 10]]), gt) == 0.5  # made up there
    assert inspection_accuracy(answer, None, gt) == 0.0  # no look
    assert inspection_accuracy(answer, torch.zeros((0, 4)), gt) == 0.0
    assert inspection_accuracy(None, look, gt) == 0.0  # no answer
    # An unmatched box in an ignore region counts neither way, as in the accuracy reward.
    assert inspection_accuracy(strip((0, 10), (12, 18)), look, gt[:1], strip((11, 19))) == 1.0


# --- properties ------------------------------------------------------------------------------------


@st.composite
def box_sets(draw, max_size=12, size=200):
    rows = draw(
        st.lists(
            st.tuples(st.integers(0, size), st.integers(0, size), st.integers(1, 60), st.integers(1, 60)),
            max_size=max_size,
        )
    )
    return torch.tensor([[x, y, x + w, y + h] for x, y, w, h in rows], dtype=torch.float32).reshape(-1, 4)


weights = st.floats(0, 5).filter(lambda w: w > 1e-3)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(box_sets(), box_sets(), box_sets(max_size=3), weights, weights, st.booleans(), st.floats(0.1, 0.9))
def test_reward_in_unit_interval_and_order_invariant(pred, gt, ignore, pw, rw, iou_weighted, thr):
    kw = dict(precision_weight=pw, recall_weight=rw, iou_weighted=iou_weighted, iou_threshold=thr)
    value = precision_recall_reward(pred, gt, ignore, **kw)
    assert math.isfinite(value) and 0.0 <= value <= 1.0
    perm = torch.randperm(len(pred), generator=torch.Generator().manual_seed(0))
    assert precision_recall_reward(pred[perm], gt, ignore, **kw) == pytest.approx(value, abs=1e-9)
    assert precision_recall_reward(pred, gt.flip(0), ignore, **kw) == pytest.approx(value, abs=1e-9)


def lattice(cells):
    """Ground truth on a lattice of 40 x 40 slots with 30 x 30 boxes: no box overlaps another slot."""
    return torch.tensor([[40.0 * c, 40.0 * r, 40.0 * c + 30, 40.0 * r + 30] for r, c in cells]).reshape(-1, 4)


slots = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=15, unique=True)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(slots, st.data())
def test_a_duplicate_of_a_correct_box_lowers_precision(cells, data):
    gt = lattice(cells)
    found = data.draw(st.lists(st.integers(0, len(gt) - 1), min_size=1, unique=True))
    noise = torch.tensor(data.draw(st.lists(st.floats(-2, 2), min_size=4, max_size=4)))
    pred = gt[found] + noise
    dup = data.draw(st.sampled_from(found))
    with_dup = torch.cat([pred, gt[dup : dup + 1]])

    def precision(p):
        return precision_recall_reward(p, gt, precision_weight=1, recall_weight=0)

    assert precision(with_dup) < precision(pred)
    assert precision(with_dup) == pytest.approx(len(found) / (len(found) + 1))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(slots, box_sets(max_size=6, size=350), st.data())
def test_a_box_inside_an_ignore_region_changes_nothing(cells, pred, data):
    gt = lattice(cells)  # in x < 400
    ignore = torch.tensor([[500.0, 0, 700, 400]])
    x1, y1 = data.draw(st.integers(500, 690)), data.draw(st.integers(0, 390))
    x2, y2 = data.draw(st.integers(x1 + 1, 700)), data.draw(st.integers(y1 + 1, 400))
    extra = torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32)
    for kw in ({}, {"iou_weighted": True}, {"precision_weight": 1.0, "recall_weight": 0.0}):
        assert precision_recall_reward(torch.cat([pred, extra]), gt, ignore, **kw) == pytest.approx(
            precision_recall_reward(pred, gt, ignore, **kw)
        )


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.none(), box_sets(max_size=4, size=28)), min_size=2, max_size=8))
def test_look_reward_is_higher_at_the_disagreement_region(answers):
    grid, size = 8, (32, 32)  # cells of 4 x 4
    covered = rasterize_boxes(answers, size, grid).double()
    p = covered.mean(0)
    u = p * (1 - p)
    assume(u.max() > u.min())

    def cell(i):
        x, y = 4.0 * (i % grid), 4.0 * (i // grid)
        return torch.tensor([[x, y, x + 4, y + 4]])

    hot, cold = cell(int(u.flatten().argmax())), cell(int(u.flatten().argmin()))
    looks = [hot, cold] + [None] * (len(answers) - 2)
    focus, coverage = look_terms(answers, looks, size, grid=grid)
    for value in (
        look_reward(answers, looks, size, grid=grid),
        torch.from_numpy(focus),
        torch.from_numpy(coverage),
    ):
        assert torch.isfinite(value).all() and (value >= 0).all() and (value <= 1 + 1e-6).all()
        assert value[0] > value[1]
