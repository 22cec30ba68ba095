"""Reward settings that change with the training step: :class:`Ramp`, and :func:`value_at` for a setting that
is either a number or a ramp.

V-Triune (arXiv 2505.18129) raises the IoU a detection must reach as training goes: early on a loose box is
rewarded, later only a tight one. ``PrecisionRecallReward(iou_threshold=Ramp(0.5, 0.75, 1000))`` does so.
How a reward learns the step: ``GRPOModule`` calls ``RewardSuite.set_step(global_step)`` before scoring each
rollout, and the suite hands it to every reward (:meth:`dip_r1.rewards.GroupReward.set_step`); a reward scored
outside training (validation, test, predict) uses the step set last, 0 when none was.
"""

from __future__ import annotations

from dataclasses import dataclass

from dip_r1.settings import check_range


@dataclass(frozen=True)
class Ramp:
    """A value that moves linearly from ``start`` to ``end`` over the first ``steps`` optimiser steps, then
    stays at ``end``. In YAML: ``iou_threshold: {start: 0.5, end: 0.75, steps: 1000}``.

    >>> [Ramp(0.5, 0.75, 100).at(s) for s in (0, 40, 100, 500)]
    [0.5, 0.6, 0.75, 0.75]
    """

    start: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        check_range("steps", self.steps, 1)

    def at(self, step: int) -> float:
        """The value at optimiser step ``step`` (>= 0)."""
        return self.start + (self.end - self.start) * min(max(step, 0), self.steps) / self.steps


def value_at(value: float | Ramp, step: int) -> float:
    """``value`` itself, or a ramp's value at ``step``.

    >>> value_at(0.5, 10), value_at(Ramp(0.0, 1.0, 20), 10)
    (0.5, 0.5)
    """
    return value.at(step) if isinstance(value, Ramp) else float(value)


def check_value(name: str, value: float | Ramp, low: float, high: float, *, low_open: bool = False) -> None:
    """Check a number, or both ends of a ramp, against ``[low, high]`` (``(low, high]`` with ``low_open``): one
    :class:`~dip_r1.settings.SettingError` line naming ``name``."""
    if isinstance(value, Ramp):
        check_range(f"{name}.start", value.start, low, high, low_open=low_open)
        check_range(f"{name}.end", value.end, low, high, low_open=low_open)
    else:
        check_range(name, value, low, high, low_open=low_open)
