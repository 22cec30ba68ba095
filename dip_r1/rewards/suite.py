"""``RewardSuite``: named rewards, weighted, scored on completions parsed once."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from dip_r1.rewards.base import GroupReward
from dip_r1.rewards.modular import FormatReward, LookReward, PrecisionRecallReward
from dip_r1.rewards.parsing import ParsedCompletion, parse_completion

BLOCKS = ("think", "look", "answer")


class RewardSuite(nn.Module):
    """Combines named rewards into a weighted total, per completion.

    In YAML (LightningCLI / jsonargparse) each reward is a ``class_path`` entry, so a user reward is
    added by subclassing :class:`GroupReward` and naming it::

        rewards:
          format: {class_path: dip_r1.rewards.FormatReward}
          accuracy: {class_path: dip_r1.rewards.PrecisionRecallReward, init_args: {iou_threshold: 0.6}}
          mine: {class_path: my_package.MyReward}
        weights: {format: 0.5, mine: 2.0}

    A reward can be *gated* by another: ``gates: {look: accuracy}`` puts ``look * accuracy`` into the total in
    place of ``look`` (an inspection counts as much as the answer that follows it is right; BENCHMARKS.md,
    issue 10). Each reward is still returned and logged as scored, ungated.

    A reward can be *credited* to one block of the completion: ``credit: {look: look}`` gives the tokens of
    ``<look>`` the advantage of the whole total and every other token the advantage of the total without the
    look reward (``GRPOModule`` does this; :func:`dip_r1.grpo.block_advantages`), so the look reward judges the
    look and not the answer written after it. The default suite does so, with the look reward resolved by the
    answer (``LookReward(resolve=True)``): as first defined, the look reward lowered the tiny policy's F1
    (BENCHMARKS.md, issue 10; ``dip_r1.rewards.functional``'s docstring).
    """

    def __init__(
        self,
        rewards: dict[str, GroupReward] | None = None,
        weights: dict[str, float] | None = None,
        gates: dict[str, str] | None = None,
        credit: dict[str, str] | None = None,
    ) -> None:
        """
        Args:
            rewards: Named rewards; default ``format``, ``look`` (``LookReward(resolve=True)``) and ``accuracy``
                (precision-recall).
            weights: Weight of each reward in the total; a reward not named here weighs 1.0.
            gates: ``{reward: gate}``: the reward enters the total multiplied by the gate reward's value (in
                [0, 1]) for the same completion; e.g. ``{look: accuracy}``. Default: no gate.
            credit: ``{reward: block}``: the reward's advantage reaches only the tokens of that block
                (``think``, ``look`` or ``answer``); ``{}``: every token, as in GRPO. Default: ``{look: look}``
                with the default rewards, ``{}`` with rewards of your own.
        """
        super().__init__()
        if (
            rewards is None
        ):  # the look reward as measured to work with the other two (BENCHMARKS.md, issue 10)
            rewards = {
                "format": FormatReward(),
                "look": LookReward(resolve=True),
                "accuracy": PrecisionRecallReward(),
            }
            credit = {"look": "look"} if credit is None else credit
        if not rewards:
            raise ValueError("a RewardSuite needs at least one reward")
        if "total" in rewards:
            raise ValueError("'total' is the name of the weighted sum; name the reward otherwise")
        unknown = set(weights or {}) - set(rewards)
        if unknown:
            raise ValueError(f"weights for unknown rewards: {sorted(unknown)}")
        gates = dict(gates or {})
        bad = {f"{k}: {v}" for k, v in gates.items() if k not in rewards or v not in rewards or k == v}
        if bad:
            raise ValueError(f"gates must pair two different rewards of the suite, got {sorted(bad)}")
        credit = dict(credit or {})
        bad = {f"{k}: {v}" for k, v in credit.items() if k not in rewards or v not in BLOCKS}
        if bad:
            raise ValueError(f"credit maps a reward of the suite to one of {BLOCKS}, got {sorted(bad)}")
        self.rewards = nn.ModuleDict(rewards)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in rewards}
        self.gates = gates
        self.credit = credit
        self.total = (
            MeanMetric()
        )  # the mean of the totals: with gates it is not the weighted sum of the means

    def forward(
        self, completions: list[str] | list[ParsedCompletion], targets: list[dict], group_size: int
    ) -> dict[str, Tensor]:
        """Per-completion rewards ``Tensor[B * G]``: ``"total"`` (the weighted sum) and one per name."""
        parsed = [c if isinstance(c, ParsedCompletion) else parse_completion(c) for c in completions]
        out = {name: reward(parsed, targets, group_size) for name, reward in self.rewards.items()}
        total = self.weighted_total(out)
        self.total.update(total)
        return {"total": total, **out}

    def set_step(self, step: int) -> None:
        """Tell every reward the optimiser step it scores at (``GroupReward.set_step``); ``GRPOModule`` calls
        this with its ``global_step`` before scoring each rollout, so a scheduled setting follows training and
        an exact resume (which restores ``global_step``) restores it too."""
        for reward in self.rewards.values():
            reward.set_step(step)

    def weighted_total(self, scores: dict[str, Tensor], without: Collection[str] = ()) -> Tensor:
        """The weighted (and gated) sum of ``scores`` over the rewards not in ``without``, ``Tensor[B * G]``."""
        terms = (
            self.weights[name] * scores[name] * (scores[self.gates[name]] if name in self.gates else 1.0)
            for name in self.rewards
            if name not in without
        )
        return sum(terms, torch.zeros_like(scores[next(iter(self.rewards))]))

    def compute(self) -> dict[str, Tensor]:
        """Mean of each reward since the last reset, and the mean of the totals as ``"total"``."""
        means = {name: reward.compute() for name, reward in self.rewards.items()}
        return {"total": self.total.compute().float(), **means}

    def reset(self) -> None:
        """Reset every reward's accumulated states."""
        for reward in self.rewards.values():
            reward.reset()
        self.total.reset()
