"""``DetectionMetrics``: the evaluation metrics of crowded-scene detection, as a torchmetrics Metric.

Precision, recall and F1 count one-to-one matches exactly as the accuracy reward does
(:func:`dip_r1.rewards.functional.match_detections`); AP and AP50 are COCO's, computed by
faster-coco-eval with ignore regions as crowd regions; MR^-2 is the log-average miss rate of
CityPersons and CrowdHuman.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from dip_r1.boxes import box_ioa_numpy, box_iou_numpy
from dip_r1.rewards.functional import match_detections

# FPPI reference points of the log-average miss rate: 9 points evenly spaced in log from 1e-2 to 1.
_FPPI_REFS = np.logspace(-2, 0, 9)


class DetectionMetrics(Metric):
    """Precision, recall, F1, mean IoU, count MAE, and with scores COCO AP, AP50 and MR^-2.

    ``update(preds, targets)`` takes torchmetrics-style lists, one dict per image: ``preds`` with
    ``boxes`` (``Tensor[N, 4]`` xyxy) and optional ``scores`` (``Tensor[N]``), ``targets`` with
    ``boxes`` and optional ``ignore`` (``Tensor[M, 4]`` regions). ``compute()`` returns ``precision``,
    ``recall``, ``f1`` (micro-averaged, IoU 0.5), the same keys suffixed ``@t`` for each threshold
    ``t`` of ``iou_thresholds``, ``mean_iou`` of the matches at 0.5, ``count_mae`` (counted
    predictions against ground truth, per image) and, when every image had scores, ``ap``, ``ap50``
    and ``mr2``.

    >>> m = DetectionMetrics()
    >>> m.update([{"boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]])}],
    ...          [{"boxes": torch.tensor([[0.0, 0, 10, 10]])}])
    >>> {k: round(float(v), 3) for k, v in m.compute().items() if k in ("precision", "recall", "f1")}
    {'precision': 0.5, 'recall': 1.0, 'f1': 0.667}
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        iou_thresholds: Sequence[float] = (0.5, 0.75),
        ignore_ioa: float = 0.5,
        max_detections: int = 1000,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            iou_thresholds: IoU thresholds at which precision, recall and F1 are also reported (``f1@0.75``).
            ignore_ioa: Least intersection over its own area with an ignore region for an unmatched
                prediction to be neither a true nor a false positive.
            max_detections: Most detections per image kept by the COCO evaluation (crowds exceed COCO's 100).
            kwargs: Passed to ``torchmetrics.Metric``.
        """
        super().__init__(**kwargs)
        self.iou_thresholds = [float(t) for t in iou_thresholds]
        if any(not 0 < t <= 1 for t in self.iou_thresholds):
            raise ValueError(f"IoU thresholds must lie in (0, 1], got {self.iou_thresholds}")
        self._thresholds = sorted({0.5, *self.iou_thresholds})
        self.ignore_ioa = ignore_ioa
        self.max_detections = max_detections
        n = len(self._thresholds)
        for name, size in (("tp", n), ("num_pred", n)):
            self.add_state(name, default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("num_gt", "iou_sum", "abs_count_error", "num_images", "num_unscored"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        # Per-image data for AP and MR^-2, flattened to 1-D float32 so that "cat" over DDP ranks
        # (which joins each state into one tensor) keeps working, even for a rank with no images;
        # "sizes" holds (num_pred, num_gt, num_ignore) per image to split them again.
        for name in ("pred_boxes", "pred_scores", "gt_boxes", "ignore_boxes", "sizes"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        """Add a batch of images: ``preds`` and ``targets`` are lists of dicts, one per image."""
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        for pred, target in zip(preds, targets):
            self._update_image(pred, target)

    def _update_image(self, pred: dict[str, Tensor], target: dict[str, Tensor]) -> None:
        boxes = _flat(pred["boxes"])
        gt, ignore = _flat(target["boxes"]), _flat(target.get("ignore"))
        scores = pred.get("scores")
        scores = torch.ones(len(boxes)) if scores is None else torch.as_tensor(scores).detach().float().cpu()
        if scores.shape != (len(boxes),):
            raise ValueError(f"{len(boxes)} boxes but scores of shape {tuple(scores.shape)}")
        counts = []
        for threshold in self._thresholds:
            m = match_detections(boxes, gt, ignore, iou_threshold=threshold, ignore_ioa=self.ignore_ioa)
            counts.append((len(m.pred_index), m.num_pred))
            if threshold == 0.5:
                self.iou_sum += float(m.ious.sum())
                self.abs_count_error += abs(m.num_pred - m.num_gt)
        counts_t = torch.tensor(counts, dtype=torch.float64, device=self.tp.device)
        self.tp += counts_t[:, 0]
        self.num_pred += counts_t[:, 1]
        self.num_gt += len(gt)
        self.num_images += 1
        self.num_unscored += float(pred.get("scores") is None)
        device = self.tp.device
        self.pred_boxes.append(boxes.reshape(-1).to(device))
        self.pred_scores.append(scores.to(device))
        self.gt_boxes.append(gt.reshape(-1).to(device))
        self.ignore_boxes.append(ignore.reshape(-1).to(device))
        self.sizes.append(
            torch.tensor([len(boxes), len(gt), len(ignore)], dtype=torch.float32, device=device)
        )

    def compute(self) -> dict[str, Tensor]:
        """The metrics over every image seen since the last reset (on every DDP rank)."""
        out: dict[str, Tensor] = {}
        for i, threshold in enumerate(self._thresholds):
            tp, num_pred, num_gt = float(self.tp[i]), float(self.num_pred[i]), float(self.num_gt)
            precision = tp / num_pred if num_pred else 0.0
            recall = tp / num_gt if num_gt else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            values = {"precision": precision, "recall": recall, "f1": f1}
            if threshold == 0.5:
                out.update({k: torch.tensor(v) for k, v in values.items()})
                out["mean_iou"] = torch.tensor(float(self.iou_sum) / tp if tp else 0.0)
            if threshold in self.iou_thresholds:
                out.update({f"{k}@{threshold:g}": torch.tensor(v) for k, v in values.items()})
        images = float(self.num_images)
        out["count_mae"] = torch.tensor(float(self.abs_count_error) / images if images else 0.0)
        if images and not float(self.num_unscored):
            per_image = self._per_image()
            ap, ap50 = coco_average_precision(per_image, self.max_detections)
            out.update(ap=torch.tensor(ap), ap50=torch.tensor(ap50))
            out["mr2"] = torch.tensor(log_average_miss_rate(per_image, ignore_ioa=self.ignore_ioa))
        return out

    def _per_image(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """``(boxes, scores, gt, ignore)`` numpy arrays per image, from the flattened states."""
        sizes = _cat(self.sizes).reshape(-1, 3).astype(np.int64)
        flat = [_cat(self.pred_boxes), _cat(self.pred_scores), _cat(self.gt_boxes), _cat(self.ignore_boxes)]
        splits = [np.cumsum(sizes[:, k] * width)[:-1] for k, width in ((0, 4), (0, 1), (1, 4), (2, 4))]
        parts = [np.split(array, split) for array, split in zip(flat, splits)]
        return [(b.reshape(-1, 4), s, g.reshape(-1, 4), i.reshape(-1, 4)) for b, s, g, i in zip(*parts)]


def coco_average_precision(
    images: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], max_detections: int = 1000
) -> tuple[float, float]:
    """COCO AP@[.5:.95] and AP50 of ``(boxes, scores, gt, ignore)`` per image, by faster-coco-eval.

    Ignore regions are COCO crowd regions (``iscrowd=1``): a detection matching one is not counted.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    gt_anns, dets = [], []
    for image_id, (boxes, scores, gt, ignore) in enumerate(images):
        for crowd, regions in ((0, gt), (1, ignore)):
            for x1, y1, x2, y2 in regions.tolist():
                w, h = x2 - x1, y2 - y1
                ann = {"image_id": image_id, "category_id": 1, "bbox": [x1, y1, w, h], "area": w * h}
                gt_anns.append({**ann, "id": len(gt_anns) + 1, "iscrowd": crowd})
        for (x1, y1, x2, y2), score in zip(boxes.tolist(), scores.tolist()):
            dets.append(
                {"image_id": image_id, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
            )
    if not any(ann["iscrowd"] == 0 for ann in gt_anns):
        return float("nan"), float("nan")  # AP is undefined without ground truth
    if not dets:
        return 0.0, 0.0
    dataset = {
        "images": [{"id": i} for i in range(len(images))],
        "annotations": gt_anns,
        "categories": [{"id": 1, "name": "object"}],
    }
    quiet = logging.getLogger("faster_coco_eval").debug
    coco_gt = COCO(dataset, print_function=quiet)
    coco_dt = coco_gt.loadRes(dets)
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=quiet)
    evaluator.params.maxDets = [1, 10, max_detections]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    # COCO reports -1 where no ground-truth box falls in its area range (only degenerate boxes): undefined too
    ap, ap50 = (float(v) if v >= 0 else float("nan") for v in evaluator.stats[:2])
    return ap, ap50


def log_average_miss_rate(
    images: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    *,
    iou_threshold: float = 0.5,
    ignore_ioa: float = 0.5,
) -> float:
    """MR^-2 of ``(boxes, scores, gt, ignore)`` per image: the geometric mean of the miss rate at 9
    FPPI points evenly spaced in log space over [1e-2, 1] (Caltech / CityPersons / CrowdHuman).

    Detections are matched greedily in descending score, each to the unmatched ground-truth box of
    highest IoU (>= ``iou_threshold``); an unmatched detection covering an ignore region by
    ``ignore_ioa`` of its area is neither true nor false positive. Lower is better.

    >>> gt = np.array([[0.0, 0, 10, 10], [20, 0, 30, 10]])  # one of two found, no false positive
    >>> log_average_miss_rate([(gt[:1], np.array([0.9]), gt, np.zeros((0, 4)))])
    0.5
    """
    scores, is_tp, is_fp = [], [], []
    num_gt = 0
    for boxes, image_scores, gt, ignore in images:
        num_gt += len(gt)
        order = np.argsort(-image_scores, kind="stable")
        boxes, image_scores = boxes[order], image_scores[order]
        iou = box_iou_numpy(boxes, gt) if len(gt) else np.zeros((len(boxes), 0))
        ioa = box_ioa_numpy(boxes, ignore).max(1, initial=0.0) if len(ignore) else np.zeros(len(boxes))
        taken = np.zeros(len(gt), dtype=bool)
        tp = np.zeros(len(boxes), dtype=bool)
        for d in range(len(boxes)):  # greedy in score order is the protocol: not vectorisable
            row = np.where(taken, -1.0, iou[d]) if len(gt) else iou[d]
            if len(gt) and row.max() >= iou_threshold:
                taken[row.argmax()] = tp[d] = True
        counted = tp | (ioa < ignore_ioa)
        scores.append(image_scores[counted])
        is_tp.append(tp[counted])
        is_fp.append(~tp[counted])
    if num_gt == 0:
        return float("nan")
    if not sum(len(s) for s in scores):  # no counted detection: everything is missed at every FPPI
        return 1.0
    order = np.argsort(-np.concatenate(scores), kind="stable")
    tp_cum = np.cumsum(np.concatenate(is_tp)[order])
    fp_cum = np.cumsum(np.concatenate(is_fp)[order])
    miss = 1.0 - tp_cum / num_gt
    fppi = fp_cum / len(images)
    # Miss rate at each reference: the last point of the curve whose FPPI does not exceed it.
    at = np.searchsorted(fppi, _FPPI_REFS, side="right") - 1
    refs = np.where(at >= 0, miss[np.maximum(at, 0)], 1.0)
    return float(np.exp(np.log(np.maximum(refs, 1e-10)).mean()))


def _flat(boxes: Tensor | None) -> Tensor:
    if boxes is None:
        return torch.zeros((0, 4))
    return torch.as_tensor(boxes).detach().float().cpu().reshape(-1, 4)


def _cat(state: list[Tensor] | Tensor) -> np.ndarray:
    if isinstance(state, list):
        state = dim_zero_cat(state) if state else torch.zeros(0)
    return state.detach().cpu().double().numpy().reshape(-1)
