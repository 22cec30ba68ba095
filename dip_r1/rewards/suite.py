"""``RewardSuite``: named rewards, weighted, scored on completions parsed once."""

from __future__ import annotations

from torch import Tensor, nn

from dip_r1.rewards.base import GroupReward
from dip_r1.rewards.modular import FormatReward, LookReward, PrecisionRecallReward
from dip_r1.rewards.parsing import ParsedCompletion, parse_completion


class RewardSuite(nn.Module):
    """Combines named rewards into a weighted total, per completion.

    In YAML (LightningCLI / jsonargparse) each reward is a ``class_path`` entry, so a user reward is
    added by subclassing :class:`GroupReward` and naming it::

        rewards:
          format: {class_path: dip_r1.rewards.FormatReward}
          accuracy: {class_path: dip_r1.rewards.PrecisionRecallReward, init_args: {iou_threshold: 0.6}}
          mine: {class_path: my_package.MyReward}
        weights: {format: 0.5, mine: 2.0}
    """

    def __init__(
        self,
        rewards: dict[str, GroupReward] | None = None,
        weights: dict[str, float] | None = None,
    ) -> None:
        """
        Args:
            rewards: Named rewards; default ``format``, ``look`` and ``accuracy`` (precision-recall).
            weights: Weight of each reward in the total; a reward not named here weighs 1.0.
        """
        super().__init__()
        if rewards is None:
            rewards = {"format": FormatReward(), "look": LookReward(), "accuracy": PrecisionRecallReward()}
        if not rewards:
            raise ValueError("a RewardSuite needs at least one reward")
        if "total" in rewards:
            raise ValueError("'total' is the name of the weighted sum; name the reward otherwise")
        unknown = set(weights or {}) - set(rewards)
        if unknown:
            raise ValueError(f"weights for unknown rewards: {sorted(unknown)}")
        self.rewards = nn.ModuleDict(rewards)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in rewards}

    def forward(
        self, completions: list[str] | list[ParsedCompletion], targets: list[dict], group_size: int
    ) -> dict[str, Tensor]:
        """Per-completion rewards ``Tensor[B * G]``: ``"total"`` (the weighted sum) and one per name."""
        parsed = [c if isinstance(c, ParsedCompletion) else parse_completion(c) for c in completions]
        out = {name: reward(parsed, targets, group_size) for name, reward in self.rewards.items()}
        total = sum(self.weights[name] * value for name, value in out.items())
        return {"total": total, **out}

    def compute(self) -> dict[str, Tensor]:
        """Mean of each reward since the last reset, and the weighted sum of the means as ``"total"``."""
        means = {name: reward.compute() for name, reward in self.rewards.items()}
        total = sum(self.weights[name] * value for name, value in means.items())
        return {"total": total, **means}

    def reset(self) -> None:
        """Reset every reward's accumulated states."""
        for reward in self.rewards.values():
            reward.reset()
