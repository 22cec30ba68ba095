"""``GroupReward``: the base class of every reward, a ``torchmetrics.Metric``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from dip_r1.rewards.parsing import ParsedCompletion


class GroupReward(Metric):
    """A reward scored on groups of completions, and averaged like a metric.

    Subclasses implement :meth:`score`. Calling the reward (``forward``) scores a batch once,
    returns the per-completion rewards and adds them to the ``total`` / ``count`` states, which sum
    over DDP ranks, so :meth:`compute` is the mean reward of the epoch.

    Completions are prompt-major: with B prompts and group size G, completion ``j`` answers prompt
    ``j // G``. ``targets`` holds one dict per prompt: ``boxes`` (``Tensor[N, 4]``), ``ignore``
    (``Tensor[M, 4]``), ``image_size`` (``(W, H)`` of the coordinate space), optionally ``labels``.

    ``step``: the optimiser step the reward scores at, for settings that change with it
    (:mod:`dip_r1.rewards.schedule`); set by :meth:`set_step` (``RewardSuite.set_step``, called by
    ``GRPOModule`` before each rollout is scored), 0 until then.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    total: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        """
        Args:
            kwargs: Passed to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
        """
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self._last: Tensor | None = None
        self.step = 0

    def set_step(self, step: int) -> None:
        """Score from now on as at optimiser step ``step``."""
        self.step = int(step)

    def score(self, completions: list[ParsedCompletion], targets: list[dict], group_size: int) -> Tensor:
        """Per-completion rewards, ``Tensor[B * G]`` float32. Implemented by subclasses."""
        raise NotImplementedError

    def update(self, completions: list[ParsedCompletion], targets: list[dict], group_size: int) -> None:
        """Score a batch and accumulate its rewards."""
        if group_size < 1 or len(completions) != len(targets) * group_size:
            raise ValueError(
                f"{len(completions)} completions for {len(targets)} prompts with group size {group_size}"
            )
        values = torch.as_tensor(self.score(completions, targets, group_size), dtype=torch.float32)
        if values.shape != (len(completions),):
            raise ValueError(f"{type(self).__name__}.score returned shape {tuple(values.shape)}")
        self.total += values.sum().to(self.total)
        self.count += len(values)
        self._last = values

    def forward(self, completions: list[ParsedCompletion], targets: list[dict], group_size: int) -> Tensor:
        """Score a batch once, accumulate it, and return the per-completion rewards ``Tensor[B * G]``."""
        # Metric.forward would run update() on a fresh state and merge it: scoring is the costly
        # part and the states are plain sums, so update once and hand back what it scored.
        self.update(completions, targets, group_size)
        values, self._last = self._last, None
        return values

    def compute(self) -> Tensor:
        """Mean reward since the last reset (0.0 before any update)."""
        return (self.total / self.count.clamp(min=1)).float()
