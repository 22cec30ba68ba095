"""The three DIP-R1 rewards as :class:`~dip_r1.rewards.base.GroupReward` metrics."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dip_r1.boxes import DUPLICATE_IOU
from dip_r1.rewards import functional as F
from dip_r1.rewards.base import GroupReward
from dip_r1.rewards.parsing import ParsedCompletion
from dip_r1.rewards.schedule import Ramp, check_value, value_at


class FormatReward(GroupReward):
    """1.0 for a well-formed ``<think>``, ``<look>``, ``<answer>`` completion, else 0.0."""

    def score(self, completions: list[ParsedCompletion], targets: list[dict], group_size: int) -> Tensor:
        return torch.tensor([float(c.well_formed) for c in completions], dtype=torch.float32)


class LookReward(GroupReward):
    """Reward for looking where the group's answers disagree (``functional.look_reward``), resolved by the
    answer: times its accuracy inside the looked regions (``functional.inspection_accuracy``)."""

    def __init__(self, grid: int = 32, resolve: bool = True, **kwargs: Any) -> None:
        """
        Args:
            grid: Cells per side of the lattice the boxes are rasterised on, >= 1.
            resolve: Multiply each completion's look reward by how right its answer is inside the regions it
                looked at: an inspection counts once it is resolved. False scores the variance-guided term
                alone (``docs/look_reward.md``: on its own it rewarded repeated boxes).
            kwargs: Passed to ``torchmetrics.Metric``.
        """
        super().__init__(**kwargs)
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.grid = grid
        self.resolve = resolve

    def score(self, completions: list[ParsedCompletion], targets: list[dict], group_size: int) -> Tensor:
        out = []
        for b, target in enumerate(targets):
            group = completions[b * group_size : (b + 1) * group_size]
            answers, looks = [c.answer for c in group], [c.look for c in group]
            value = F.look_reward(answers, looks, target["image_size"], grid=self.grid)
            if self.resolve:
                value = value * torch.tensor(
                    [
                        F.inspection_accuracy(a, lk, target["boxes"], target.get("ignore"))
                        for a, lk in zip(answers, looks)
                    ]
                )
            out.append(value)
        return torch.cat(out) if out else torch.zeros(0)


class PrecisionRecallReward(GroupReward):
    """Weighted precision and recall of the answer boxes, matched one-to-one, with ignore regions
    (``functional.precision_recall_reward``, which documents the duplicate penalty's formula)."""

    def __init__(
        self,
        iou_threshold: float | Ramp = 0.5,
        precision_weight: float = 0.5,
        recall_weight: float = 0.5,
        iou_weighted: bool = False,
        duplicate_penalty: float = 0.0,
        duplicate_iou: float = DUPLICATE_IOU,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            iou_threshold: Least IoU for a predicted box to count as a match of a ground-truth box, in (0, 1]; or
                a :class:`~dip_r1.rewards.schedule.Ramp` that moves it with the training step (V-Triune), e.g.
                ``{start: 0.5, end: 0.75, steps: 1000}``.
            precision_weight: Weight of precision in the reward.
            recall_weight: Weight of recall in the reward.
            iou_weighted: Count each match as its IoU rather than 1.
            duplicate_penalty: In [0, 1]; 0 (default) off. The reward is multiplied by ``1 - p x d / n`` for an
                answer of ``n`` boxes of which ``d`` repeat an earlier one (IoU >= ``duplicate_iou``).
            duplicate_iou: Least IoU with an earlier answer box that makes a box a repeat, in (0, 1].
            kwargs: Passed to ``torchmetrics.Metric``.
        """
        super().__init__(**kwargs)
        if precision_weight < 0 or recall_weight < 0 or precision_weight + recall_weight <= 0:
            raise ValueError("precision_weight and recall_weight must be >= 0 with a positive sum")
        check_value("iou_threshold", iou_threshold, 0, 1, low_open=True)
        check_value("duplicate_penalty", duplicate_penalty, 0, 1)
        check_value("duplicate_iou", duplicate_iou, 0, 1, low_open=True)
        self.iou_threshold = iou_threshold
        self.precision_weight = precision_weight
        self.recall_weight = recall_weight
        self.iou_weighted = iou_weighted
        self.duplicate_penalty = duplicate_penalty
        self.duplicate_iou = duplicate_iou

    def score(self, completions: list[ParsedCompletion], targets: list[dict], group_size: int) -> Tensor:
        # Targets may sit on the GPU: copy each prompt's boxes to the host once, not once per completion.
        boxes = [(F.as_numpy_boxes(t["boxes"]), F.as_numpy_boxes(t.get("ignore"))) for t in targets]
        iou_threshold = value_at(self.iou_threshold, self.step)
        out = []
        for j, completion in enumerate(completions):
            gt, ignore = boxes[j // group_size]
            value = F.precision_recall_reward(
                completion.answer,
                gt,
                ignore,
                iou_threshold=iou_threshold,
                precision_weight=self.precision_weight,
                recall_weight=self.recall_weight,
                iou_weighted=self.iou_weighted,
                duplicate_penalty=self.duplicate_penalty,
                duplicate_iou=self.duplicate_iou,
            )
            out.append(value)
        return torch.tensor(out, dtype=torch.float32)
