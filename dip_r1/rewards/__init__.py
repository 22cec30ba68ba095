"""The DIP-R1 rewards: parsing, pure functions (``functional``) and torchmetrics twins."""

from dip_r1.rewards import functional
from dip_r1.rewards.base import GroupReward
from dip_r1.rewards.modular import FormatReward, LookReward, PrecisionRecallReward
from dip_r1.rewards.parsing import ParsedCompletion, parse_completion
from dip_r1.rewards.schedule import Ramp
from dip_r1.rewards.suite import RewardSuite

__all__ = [
    "FormatReward",
    "GroupReward",
    "LookReward",
    "ParsedCompletion",
    "PrecisionRecallReward",
    "Ramp",
    "RewardSuite",
    "functional",
    "parse_completion",
]
