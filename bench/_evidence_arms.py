"""The arms of ``bench/evidence.py`` as data: what each trains, with which rewards, and how it looks.

Imported by its bare name. An arm is a row of :data:`ARMS`; its training and evaluation configs are the
experiment's config (a ``dip-r1 fit`` recipe) with the arm's settings laid over it (:func:`grpo_model`,
:func:`sft_model`, :func:`eval_model`). A zoom arm is its text arm plus ``sampling.look_mode: zoom`` (and, for
``sft_zoom``, the zoom-format targets): nothing else differs.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Literal

LOOK_ARMS = {"format": 1.0, "look": 1.0, "accuracy": 1.0}
NO_LOOK = {"format": 1.0, "look": 0.0, "accuracy": 1.0}
TRAINING_ONLY = ("optimizer", "lr_scheduler", "rewards", "loss", "group_size", "num_iterations")
TRAINING_ONLY_POLICY = ("lora", "quantization", "gradient_checkpointing")


@dataclass(frozen=True)
class Arm:
    """One arm of the experiment."""

    name: str
    trains: Literal["none", "sft", "grpo"]
    """``none``: the base as it is; ``sft``: SFTModule, early stopped on validation; ``grpo``: GRPOModule."""
    weights: dict[str, float] | None = None
    """GRPO reward weights (format, look, accuracy). A reward of weight 0 is still scored and logged (so every
    arm's curves and zero-std ratios compare) but gives no gradient."""
    look_mode: Literal["text", "zoom"] = "text"
    """``text``: look boxes are written and read back as text; ``zoom``: the policy is shown the crops it asked
    for (``SamplingConfig.look_mode``), and SFT learns zoom-format targets."""


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("base", "none"),
        Arm("sft", "sft"),
        Arm("dip_r1", "grpo", LOOK_ARMS),
        Arm("no_look", "grpo", NO_LOOK),
        Arm("accuracy_only", "grpo", {"format": 0.0, "look": 0.0, "accuracy": 1.0}),
        Arm("base_zoom", "none", look_mode="zoom"),
        Arm("sft_zoom", "sft", look_mode="zoom"),
        Arm("dip_r1_zoom", "grpo", LOOK_ARMS, "zoom"),
        Arm("no_look_zoom", "grpo", NO_LOOK, "zoom"),
    )
}
DEFAULT_ARMS = ("base", "sft", "dip_r1", "base_zoom", "sft_zoom", "dip_r1_zoom", "no_look_zoom")
"""The arms run unless ``--arms`` says otherwise (``no_look`` and ``accuracy_only`` are ablations to add)."""
COMPARISONS = (("dip_r1_zoom", "sft"), ("dip_r1_zoom", "dip_r1"), ("dip_r1_zoom", "no_look_zoom"))
"""The differences that answer the experiment's questions, each with a paired bootstrap interval."""


@dataclass(frozen=True)
class Levers:
    """Settings of the GRPO arms' rewards beside their weights (each maps to a library option)."""

    look_weight: float = 1.0
    """Weight of the look reward in the arms that use it."""
    look_credit: bool = True
    """The look reward's advantage reaches only the ``<look>`` tokens (``RewardSuite(credit)``; False: ``{}``)."""
    look_resolve: bool = True
    """The look reward times the answer's accuracy inside the looked regions (``LookReward(resolve)``)."""
    iou_weighted: bool = False
    """The accuracy reward counts each match by its IoU (``PrecisionRecallReward(iou_weighted)``)."""


def order(names: list[str]) -> list[str]:
    """Untrained arms first, SFT arms last: an SFT arm trains at least as long as the slowest GRPO arm of its
    seed, so it needs their times."""
    rank = {"none": 0, "grpo": 1, "sft": 2}
    return sorted(names, key=lambda n: (rank[ARMS[n].trains], names.index(n)))


def unavailable(arm: Arm) -> str | None:
    """Why the library cannot run ``arm``, or None when it can: a zoom arm needs ``SamplingConfig.look_mode``
    (an SFT arm then trains on the zoom look's teacher completions: ``SFTModule``'s targets follow it)."""
    if arm.look_mode == "text":
        return None
    from dip_r1.config import SamplingConfig

    if "look_mode" not in {f.name for f in dataclasses.fields(SamplingConfig)}:
        return "this dip_r1 has no zoom look (SamplingConfig.look_mode)"
    return None


def rewards_config(arm: Arm, levers: Levers) -> dict:
    """The arm's ``RewardSuite`` as a config entry: the three rewards, the arm's weights, the levers."""
    weights = dict(arm.weights or LOOK_ARMS)
    if weights["look"]:
        weights["look"] = levers.look_weight
    look = {"class_path": "dip_r1.rewards.LookReward", "init_args": {"resolve": levers.look_resolve}}
    accuracy = {
        "class_path": "dip_r1.rewards.PrecisionRecallReward",
        "init_args": {"iou_weighted": levers.iou_weighted},
    }
    suite = {
        "rewards": {
            "format": {"class_path": "dip_r1.rewards.FormatReward"},
            "look": look,
            "accuracy": accuracy,
        },
        "weights": weights,
    }
    if not levers.look_credit:
        suite["credit"] = {}
    return {"class_path": "dip_r1.rewards.RewardSuite", "init_args": suite}


def _with_look_mode(sampling: dict | None, arm: Arm) -> dict:
    sampling = dict(sampling or {})
    if (
        arm.look_mode != "text"
    ):  # text is the library's default: unset, a config runs on a dip_r1 without zoom
        sampling["look_mode"] = arm.look_mode
    return sampling


def grpo_model(model: dict, arm: Arm, policy_path: str, levers: Levers) -> dict:
    """The GRPO arm's model config: the experiment's ``GRPOModule`` from ``policy_path`` with the arm's
    rewards and look mode."""
    out = copy.deepcopy(model)
    args = out.setdefault("init_args", {})
    args["policy"] = {**args.get("policy", {}), "path": policy_path}
    args["warm_start"] = None  # the base exists by now
    args["rewards"] = rewards_config(arm, levers)
    args["sampling"] = _with_look_mode(args.get("sampling"), arm)
    return out


def sft_model(model: dict, arm: Arm, policy_path: str, lr: float, eval_sampling: dict) -> dict:
    """The SFT arm's model config: ``SFTModule`` on the experiment's policy settings, AdamW at ``lr``,
    validating with ``eval_sampling`` (how every arm is evaluated)."""
    args = model.get("init_args", {})
    init = {
        "policy": {**args.get("policy", {}), "path": policy_path},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}},
        "sampling": _with_look_mode(eval_sampling, arm),
        "micro_batch_size": args.get("micro_batch_size", 8),
    }
    return {"class_path": "dip_r1.sft.SFTModule", "init_args": init}


def eval_model(model: dict, arm: Arm, policy_path: str, eval_sampling: dict) -> dict:
    """How every arm is evaluated: the experiment's ``GRPOModule`` (its evaluation is every module's) on the
    arm's policy folder, decoding greedily with ``eval_sampling`` and the arm's look mode."""
    out = copy.deepcopy(model)
    args = out.setdefault("init_args", {})
    # A saved policy is a plain model (adapters merged): no adapters, no quantisation to train through.
    policy = {k: v for k, v in args.get("policy", {}).items() if k not in TRAINING_ONLY_POLICY}
    args["policy"] = {**policy, "path": policy_path}
    args["warm_start"] = None
    args["sampling"] = _with_look_mode(eval_sampling, arm)
    args["eval_do_sample"] = False
    for key in TRAINING_ONLY:  # not used to evaluate (a loss with beta > 0 would copy a reference model)
        args.pop(key, None)
    return out
