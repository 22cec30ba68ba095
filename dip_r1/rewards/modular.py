"""The three DIP-R1 rewards as :class:`~dip_r1.rewards.base.GroupReward` metrics."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dip_r1.rewards import functional as F
from dip_r1.rewards.base import GroupReward
from dip_r1.rewards.parsing import ParsedCompletion


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
    """Weighted precision and recall of the answer boxes, matched one-to-one, with ignore regions."""

    def __init__(
        self,
        iou_threshold: float = 0.5,
        precision_weight: float = 0.5,
        recall_weight: float = 0.5,
        iou_weighted: bool = False,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            iou_threshold: Least IoU for a predicted box to count as a match of a ground-truth box.
            precision_weight: Weight of precision in the reward.
            recall_weight: Weight of recall in the reward.
            iou_weighted: Count each match as its IoU rather than 1.
            kwargs: Passed to ``torchmetrics.Metric``.
        """
        super().__init__(**kwargs)
        if precision_weight < 0 or recall_weight < 0 or precision_weight + recall_weight <= 0:
            raise ValueError("precision_weight and recall_weight must be >= 0 with a positive sum")
        self.iou_threshold = iou_threshold
        self.precision_weight = precision_weight
        self.recall_weight = recall_weight
        self.iou_weighted = iou_weighted

    def score(self, completions: list[ParsedCompletion], targets: list[dict], group_size: int) -> Tensor:
        # Targets may sit on the GPU: copy each prompt's boxes to the host once, not once per completion.
        boxes = [(F.as_numpy_boxes(t["boxes"]), F.as_numpy_boxes(t.get("ignore"))) for t in targets]
        out = []
        for j, completion in enumerate(completions):
            gt, ignore = boxes[j // group_size]
            value = F.precision_recall_reward(
                completion.answer,
                gt,
                ignore,
                iou_threshold=self.iou_threshold,
                precision_weight=self.precision_weight,
                recall_weight=self.recall_weight,
                iou_weighted=self.iou_weighted,
            )
            out.append(value)
        return torch.tensor(out, dtype=torch.float32)
