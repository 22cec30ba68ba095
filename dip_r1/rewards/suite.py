"""``RewardSuite``: named rewards, weighted, scored on completions parsed once, turned into advantages."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from dip_r1 import grpo
from dip_r1.rewards.base import GroupReward
from dip_r1.rewards.modular import FormatReward, LookReward, PrecisionRecallReward
from dip_r1.rewards.parsing import ParsedCompletion, parse_completion

BLOCKS = ("think", "look", "answer")


class RewardSuite(nn.Module):
    """Combines named rewards into a weighted total per completion, and the total into GRPO advantages.

    In YAML (LightningCLI / jsonargparse) each reward is a ``class_path`` entry, so a user reward is
    added by subclassing :class:`GroupReward` and naming it::

        rewards:
          format: {class_path: dip_r1.rewards.FormatReward}
          accuracy: {class_path: dip_r1.rewards.PrecisionRecallReward, init_args: {iou_threshold: 0.6}}
          mine: {class_path: my_package.MyReward}
        weights: {format: 0.5, mine: 2.0}

    A reward can be *credited* to one block of the completion: ``credit: {look: look}`` gives the tokens of
    ``<look>`` the advantage of the whole total and every other token the advantage of the total without the
    look reward (:meth:`advantages`, :func:`dip_r1.grpo.block_advantages`), so the look reward judges the look
    and not the answer written after it (``docs/look_reward.md``).
    """

    def __init__(
        self,
        rewards: dict[str, GroupReward] | None = None,
        weights: dict[str, float] | None = None,
        credit: dict[str, str] | None = None,
    ) -> None:
        """
        Args:
            rewards: Named rewards; default ``format`` (:class:`FormatReward`), ``look`` (:class:`LookReward`)
                and ``accuracy`` (:class:`PrecisionRecallReward`).
            weights: Weight of each reward in the total; a reward not named here weighs 1.0.
            credit: ``{reward: block}``: the reward's advantage reaches only the tokens of that block
                (``think``, ``look`` or ``answer``); ``{}``: every token, as in GRPO. Default: ``{look: look}``
                when the suite has a reward named ``look``, else ``{}``.
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
        if credit is None:
            credit = {"look": "look"} if "look" in rewards else {}
        bad = {f"{k}: {v}" for k, v in credit.items() if k not in rewards or v not in BLOCKS}
        if bad:
            raise ValueError(f"credit maps a reward of the suite to one of {BLOCKS}, got {sorted(bad)}")
        self.rewards = nn.ModuleDict(rewards)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in rewards}
        self.credit = dict(credit)
        self.total = MeanMetric()

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
        """The weighted sum of ``scores`` over the rewards not in ``without``, ``Tensor[B * G]``."""
        terms = (self.weights[name] * scores[name] for name in self.rewards if name not in without)
        return sum(terms, torch.zeros_like(scores[next(iter(self.rewards))]))

    def advantages(
        self,
        scores: dict[str, Tensor],
        group_size: int,
        scale: str = "group",
        block_mask: Callable[[str], Tensor] | None = None,
    ) -> Tensor:
        """GRPO advantages of ``scores`` (:meth:`forward`'s): ``Tensor[N]``, or ``Tensor[N, T]`` per token when
        a reward is credited to a block.

        ``block_mask(block)`` gives the ``Tensor[N, T]`` bool tokens of a block
        (:func:`dip_r1.credit.block_token_mask`); needed only when :attr:`credit` is not empty. Tokens of a
        credited block get the advantage of the rewards not credited elsewhere; every other token the
        advantage of the rewards credited to no block.
        """
        total = grpo.group_advantages(scores["total"], group_size, scale=scale)  # [N]
        if not self.credit:
            return total
        if block_mask is None:
            raise ValueError("a suite that credits a reward to a block needs block_mask")
        outside, inside = self._credited_totals(scores)
        out = grpo.group_advantages(outside, group_size, scale).to(total)  # [N], then [N, T]
        for block, values in inside.items():
            advantages = grpo.group_advantages(values, group_size, scale)
            out = grpo.block_advantages(out, advantages.to(total), block_mask(block).to(total.device))
        return out

    def _credited_totals(self, scores: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The partial totals a credited suite takes advantages of: the rewards credited to no block (for the
        tokens outside every credited block), and per block the rewards not credited elsewhere."""
        outside = self.weighted_total(scores, without=set(self.credit))
        inside = {
            block: self.weighted_total(scores, without={n for n, b in self.credit.items() if b != block})
            for block in dict.fromkeys(self.credit.values())
        }
        return outside, inside

    def flat_groups(self, scores: dict[str, Tensor], group_size: int) -> Tensor:
        """``Tensor[B]`` bool: groups whose every advantage is 0 (:meth:`advantages`), so that they give the loss
        nothing but the KL term: the total, and with credit each partial total it takes, is equal over the group.

        >>> suite = RewardSuite({"a": FormatReward()})
        >>> suite.flat_groups({"total": torch.tensor([1.0, 1.0, 0.0, 1.0]), "a": torch.zeros(4)}, 2).tolist()
        [True, False]
        """
        series = [scores["total"]]
        if self.credit:
            outside, inside = self._credited_totals(scores)
            series += [outside, *inside.values()]
        flat = [grpo.zero_std_mask(values, group_size).view(-1, group_size)[:, 0] for values in series]
        return torch.stack(flat).all(dim=0)

    def compute(self) -> dict[str, Tensor]:
        """Mean of each reward since the last reset, and the mean of the totals as ``"total"``."""
        means = {name: reward.compute() for name, reward in self.rewards.items()}
        return {"total": self.total.compute().float(), **means}

    def reset(self) -> None:
        """Reset every reward's accumulated states."""
        for reward in self.rewards.values():
            reward.reset()
        self.total.reset()
