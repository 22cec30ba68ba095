"""The three DIP-R1 rewards as pure functions, and the one-to-one box matching they share.

Boxes are xyxy in the model's coordinate space (tensors or arrays). :func:`match_detections` is
also what :class:`dip_r1.metrics.DetectionMetrics` counts with, so training and evaluation agree.

The look reward is :func:`look_reward` (look where the group's answers disagree) times
:func:`inspection_accuracy` (the answer's accuracy inside the looked regions), credited to the ``<look>``
tokens by the default :class:`~dip_r1.rewards.RewardSuite`; ``docs/look_reward.md`` tells what was measured
and why.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from dip_r1.boxes import DUPLICATE_IOU, box_ioa_numpy, box_iou_numpy, repeated_boxes
from dip_r1.rewards.parsing import parse_completion

# Among assignments of equal total IoU, prefer the one with more pairs, so that the reward does
# not depend on the order of the predictions (0.5 + 0.5 ties 1.0). Far below float32 IoU noise.
_PAIR_BONUS = 1e-9


def format_reward(text: str) -> float:
    """1.0 iff the text is ``<think>…</think><look>[…]</look><answer>[…]</answer>``, else 0.0.

    Exactly one block of each, in that order, nothing but whitespace outside them, and both look
    and answer valid JSON box lists (empty lists allowed).

    >>> format_reward("<think>x</think>\\n<look>[]</look>\\n<answer>[[1, 2, 3, 4]]</answer>")
    1.0
    >>> format_reward("<think>x</think><answer>[[1, 2, 3, 4]]</answer><look>[]</look>")
    0.0
    """
    return float(parse_completion(text).well_formed)


def match_boxes(iou: np.ndarray, iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of rows (predictions) to columns (targets) from an IoU matrix.

    Maximises the total IoU over pairs whose IoU is >= ``iou_threshold`` (Hungarian, not greedy);
    returns ``(rows, cols)`` of the kept pairs.

    >>> match_boxes(np.array([[0.9, 0.6], [0.6, 0.0]]))  # greedy would keep one pair, 0.9
    (array([0, 1]), array([1, 0]))
    """
    iou = np.asarray(iou)
    rows, cols = np.nonzero(iou >= iou_threshold)
    if rows.size == 0:
        return rows, cols
    # Candidate pairs are sparse: a pair whose row and column have no other candidate is its own
    # connected component and is matched as is; the assignment runs on the rest only.
    row_degree = np.bincount(rows, minlength=iou.shape[0])
    col_degree = np.bincount(cols, minlength=iou.shape[1])
    single = (row_degree[rows] == 1) & (col_degree[cols] == 1)
    if single.all():
        return rows, cols
    sub_rows, sub_cols = np.unique(rows[~single]), np.unique(cols[~single])
    sub = iou[np.ix_(sub_rows, sub_cols)].astype(np.float64)
    weights = np.where(sub >= iou_threshold, sub + _PAIR_BONUS, 0.0)
    r, c = linear_sum_assignment(weights, maximize=True)
    kept = weights[r, c] > 0
    out_rows = np.concatenate([rows[single], sub_rows[r[kept]]])
    out_cols = np.concatenate([cols[single], sub_cols[c[kept]]])
    order = np.argsort(out_rows, kind="stable")
    return out_rows[order], out_cols[order]


class Matches(NamedTuple):
    """Result of :func:`match_detections`."""

    pred_index: np.ndarray
    """Matched prediction rows."""
    gt_index: np.ndarray
    """Matched ground-truth rows, aligned with ``pred_index``."""
    ious: np.ndarray
    """IoU of each matched pair."""
    num_pred: int
    """Predictions counted: all but the unmatched ones lying in an ignore region."""
    num_gt: int
    """Ground-truth boxes."""


def match_detections(
    pred: Tensor | np.ndarray,
    gt: Tensor | np.ndarray,
    ignore: Tensor | np.ndarray | None = None,
    *,
    iou_threshold: float = 0.5,
    ignore_ioa: float = 0.5,
) -> Matches:
    """Match predictions to ground truth one-to-one and apply the ignore-region rule.

    An unmatched prediction whose intersection over its own area with any ignore region is
    ``>= ignore_ioa`` is neither a true nor a false positive (CrowdHuman / CityPersons protocol).
    """
    pred, gt = as_numpy_boxes(pred), as_numpy_boxes(gt)
    if len(pred) and len(gt):
        iou = box_iou_numpy(pred, gt)
        rows, cols = match_boxes(iou, iou_threshold)
        ious = iou[rows, cols]
    else:
        rows = cols = np.zeros(0, dtype=np.int64)
        ious = np.zeros(0)
    num_pred = len(pred)
    ignore = as_numpy_boxes(ignore)
    if len(ignore) and num_pred > len(rows):
        unmatched = np.ones(len(pred), dtype=bool)
        unmatched[rows] = False
        ioa = box_ioa_numpy(pred[unmatched], ignore)
        num_pred -= int((ioa.max(1) >= ignore_ioa).sum())
    return Matches(rows, cols, ious, num_pred, len(gt))


def precision_recall_reward(
    pred: Tensor | np.ndarray | None,
    gt: Tensor | np.ndarray,
    ignore: Tensor | np.ndarray | None = None,
    *,
    iou_threshold: float = 0.5,
    precision_weight: float = 0.5,
    recall_weight: float = 0.5,
    iou_weighted: bool = False,
    duplicate_penalty: float = 0.0,
    duplicate_iou: float = DUPLICATE_IOU,
) -> float:
    """Weighted mean of precision and recall of one-to-one matched boxes, in [0, 1].

    TP is the number of matched pairs (their summed IoU when ``iou_weighted``); precision is
    TP / counted predictions, recall TP / ground truth. No ground truth and no prediction gives 1.0,
    ground truth but no prediction 0.0, predictions but no ground truth precision 0 and recall 1.
    ``pred=None`` (no parseable answer) gives 0.0.

    ``duplicate_penalty`` ``p`` in [0, 1] (VisionReasoner's penalty on repeated boxes): with ``n`` answer
    boxes of which ``d`` overlap an earlier one at IoU >= ``duplicate_iou`` (:func:`dip_r1.boxes.repeated_boxes`),
    the reward is ``(weighted P/R) x (1 - p x d / n)``. A repeat is already a false positive of the one-to-one
    matching; the factor makes it cost more than a box in the wrong place, and keeps the reward in [0, 1].

    >>> gt = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]])
    >>> precision_recall_reward(torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]]), gt)
    0.5
    >>> twice = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 9]])  # P 1/2, R 1/2; 1 repeat of 2 boxes
    >>> precision_recall_reward(twice, gt), precision_recall_reward(twice, gt, duplicate_penalty=1.0)
    (0.5, 0.25)
    """
    if precision_weight < 0 or recall_weight < 0 or precision_weight + recall_weight <= 0:
        raise ValueError("precision_weight and recall_weight must be >= 0 with a positive sum")
    if pred is None:
        return 0.0
    m = match_detections(pred, gt, ignore, iou_threshold=iou_threshold)
    if m.num_gt == 0:
        precision, recall = (1.0, 1.0) if m.num_pred == 0 else (0.0, 1.0)
    elif m.num_pred == 0:
        precision, recall = 0.0, 0.0
    else:
        tp = float(m.ious.sum()) if iou_weighted else float(len(m.pred_index))
        precision, recall = tp / m.num_pred, tp / m.num_gt
    value = (precision_weight * precision + recall_weight * recall) / (precision_weight + recall_weight)
    if duplicate_penalty > 0:
        boxes = torch.as_tensor(as_numpy_boxes(pred))
        value *= 1.0 - duplicate_penalty * repeated_boxes(boxes, duplicate_iou) / max(len(boxes), 1)
    return value


def inspection_accuracy(
    pred: Tensor | np.ndarray | None,
    look: Tensor | np.ndarray | None,
    gt: Tensor | np.ndarray,
    ignore: Tensor | np.ndarray | None = None,
    *,
    iou_threshold: float = 0.5,
) -> float:
    """How right the answer is inside the looked regions: :func:`precision_recall_reward` of the answer
    boxes against the ground-truth boxes, both restricted to those whose centre lies in a look box.

    A looked region with no object and no answer box there is resolved (1.0); no look or no parseable
    answer gives 0.0.

    >>> gt = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]])
    >>> look = torch.tensor([[0.0, 0, 12, 12]])  # holds the first object only
    >>> inspection_accuracy(torch.tensor([[0.0, 0, 10, 10], [1.0, 1, 9, 9]]), look, gt)  # a duplicate
    0.75
    """
    look = as_numpy_boxes(look)
    if pred is None or len(look) == 0:
        return 0.0
    pred, gt = as_numpy_boxes(pred), as_numpy_boxes(gt)
    return precision_recall_reward(
        pred[_centres_inside(pred, look)], gt[_centres_inside(gt, look)], ignore, iou_threshold=iou_threshold
    )


def _centres_inside(boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """``bool[N]``: the centre of ``boxes[n]`` lies inside one of ``regions``."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inside = (
        (cx[:, None] >= regions[None, :, 0])
        & (cx[:, None] <= regions[None, :, 2])
        & (cy[:, None] >= regions[None, :, 1])
        & (cy[:, None] <= regions[None, :, 3])
    )
    return inside.any(1)


def rasterize_boxes(boxes: list[Tensor | None], image_size: tuple[float, float], grid: int = 32) -> Tensor:
    """``Tensor[len(boxes), grid, grid]`` bool: cell ``[g, y, x]`` is covered when its centre lies in
    one of ``boxes[g]`` (None: no box).

    >>> rasterize_boxes([torch.tensor([[0.0, 0, 2, 2]])], (4, 4), grid=4)[0].int().tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    """
    return torch.from_numpy(_rasterize(boxes, image_size, grid) > 0)


def _rasterize(boxes: list[Tensor | None], image_size: tuple[float, float], grid: int) -> np.ndarray:
    """Number of ``boxes[g]`` covering each cell, ``[G, grid, grid]`` float64.

    Vectorised with a summed-area difference array: +1/-1 at the four corners of each box's cell
    range, then two cumulative sums; no loop over cells or boxes. In numpy rather than torch: on
    arrays this small torch's intra-op threads made it 10-40x slower when the cores are busy.
    """
    width, height = float(image_size[0]), float(image_size[1])
    parts = [as_numpy_boxes(b) for b in boxes]
    owner = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    side = grid + 1
    if len(owner) == 0 or not width > 0 or not height > 0:
        return np.zeros((len(parts), grid, grid))
    # Cell k has its centre at (k + 0.5) * size / grid: it is inside [a, b] for k in [lo, hi).
    cell = np.concatenate(parts).astype(np.float64) * ([grid / width, grid / height] * 2) - 0.5
    finite = np.isfinite(cell).all(1)
    owner, cell = owner[finite], cell[finite]
    # Clip before the cast to integers, so that huge coordinates cannot overflow.
    lo = np.clip(np.ceil(cell[:, :2]), 0, grid).astype(np.int64)
    hi = np.clip(np.floor(cell[:, 2:]) + 1, 0, grid).astype(np.int64)
    keep = (lo < hi).all(1)
    base, lo, hi = owner[keep] * side * side, lo[keep], hi[keep]
    index = np.concatenate(
        [base + lo[:, 1] * side + lo[:, 0], base + lo[:, 1] * side + hi[:, 0]]
        + [base + hi[:, 1] * side + lo[:, 0], base + hi[:, 1] * side + hi[:, 0]]
    )
    sign = np.repeat([1.0, -1.0, -1.0, 1.0], len(base))
    diff = np.bincount(index, weights=sign, minlength=len(parts) * side * side)
    counts = diff.reshape(len(parts), side, side).cumsum(1).cumsum(2)
    return counts[:, :grid, :grid]


def look_terms(
    answers: list[Tensor | None],
    looks: list[Tensor | None],
    image_size: tuple[float, float],
    *,
    grid: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """The two terms of :func:`look_reward`, ``(focus, coverage)``, each ``ndarray[G]``.

    U = p (1 - p) per cell, p the fraction of the group whose answer covers the cell. For look mask
    L: focus = sum(U L) / (|L| max U), coverage = sum(U L) / sum(U); both 0.0 when the group agrees
    everywhere, or for a missing or empty look.

    >>> a = [torch.tensor([[0.0, 0, 2, 2]]), None]  # they disagree on the top-left quarter
    >>> focus, coverage = look_terms(a, [torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[0.0, 0, 4, 4]])], (4, 4), grid=4)
    >>> focus.tolist(), coverage.tolist()
    ([1.0, 0.25], [1.0, 1.0])
    """
    if len(answers) != len(looks):
        raise ValueError(f"{len(answers)} answers but {len(looks)} looks")
    p = (_rasterize(answers, image_size, grid) > 0).mean(0)
    u = p * (1 - p)
    u_max, u_sum = u.max(initial=0.0), u.sum()
    if u_max <= 0:
        return np.zeros(len(looks)), np.zeros(len(looks))
    mask = _rasterize(looks, image_size, grid) > 0
    hit = (mask * u).sum((1, 2))
    area = mask.sum((1, 2))
    return hit / (np.maximum(area, 1) * u_max), hit / u_sum  # hit is 0 where the area is


def look_reward(
    answers: list[Tensor | None],
    looks: list[Tensor | None],
    image_size: tuple[float, float],
    *,
    grid: int = 32,
) -> Tensor:
    """Reward for looking where a prompt's group of G sampled answers disagree, ``Tensor[G]``: the harmonic
    mean of :func:`look_terms`' focus and coverage (0.0 when either is).

    >>> a = [torch.tensor([[0.0, 0, 2, 2]]), None]  # they disagree on the top-left quarter
    >>> look_reward(a, [torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[0.0, 0, 4, 4]])], (4, 4), grid=4)
    tensor([1.0000, 0.4000])
    """
    focus, coverage = look_terms(answers, looks, image_size, grid=grid)
    both = focus + coverage
    value = np.where(focus * coverage > 0, 2 * focus * coverage / np.maximum(both, 1e-12), 0.0)
    return torch.from_numpy(value.astype(np.float32))


def as_numpy_boxes(boxes: Tensor | np.ndarray | list | None) -> np.ndarray:
    """Boxes as a ``[N, 4]`` numpy array (float32 kept, anything else float64); None gives ``[0, 4]``."""
    if boxes is None:
        return np.zeros((0, 4))
    if isinstance(boxes, Tensor):
        boxes = boxes.detach().cpu().numpy()
    boxes = np.asarray(boxes)
    # float32 stays float32 (parsed answers are): half the memory traffic of the IoU matrix.
    return boxes.astype(boxes.dtype if boxes.dtype == np.float32 else np.float64, copy=False).reshape(-1, 4)
