"""The experiment of ``bench/evidence.py``: its data sets, the training of one arm, the evaluation of a policy.

Imported by its bare name (the script runs as ``python bench/evidence.py``). Every arm trains through a
Lightning Trainer in this process, from the same base, on the same stream of training images, for the same
number of optimiser steps; they differ only in the module (``SFTModule`` or ``GRPOModule``) and, for the GRPO
arms, in the weights of the rewards.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from dip_r1.config import LossConfig, SamplingConfig
from dip_r1.data import DetectionDataModule
from dip_r1.data.prompts import DetectionPromptBuilder
from dip_r1.data.sources import SyntheticCrowd
from dip_r1.export import copy_processor_files
from dip_r1.models import PolicySpec
from dip_r1.rewards import FormatReward, LookReward, PrecisionRecallReward, RewardSuite
from dip_r1.tiny.curriculum import TINY_SYSTEM_PROMPT

ARMS = ("base", "sft", "dip_r1", "no_look", "accuracy_only")
SETS = ("in_domain", "out_of_domain")
METRICS = ("precision", "recall", "f1", "ap50", "ap", "mr2", "format_valid")
ANSWER_STATS = ("duplicate_ratio", "look_boxes")
"""What the answers look like (``dip-r1 validate`` logs them too): the share of answer boxes that repeat an earlier
one (IoU >= 0.7) and the look boxes per image; in ``diagnostics.json``, not ``results.json``."""
REWARD_WEIGHTS = {
    "dip_r1": {"format": 1.0, "look": 1.0, "accuracy": 1.0},
    "no_look": {"format": 1.0, "look": 0.0, "accuracy": 1.0},
    "accuracy_only": {"format": 0.0, "look": 0.0, "accuracy": 1.0},
}
"""Each GRPO arm's reward weights. A reward of weight 0 is still computed and logged (so every arm's curves and
zero-std ratios can be compared) but is not in the total the advantages come from: it gives no gradient."""


@dataclass(frozen=True)
class SetSpec:
    """One synthetic set: the arguments of :class:`~dip_r1.quickstart.SyntheticCrowd`."""

    n: int
    seed: int
    width: int = 160
    height: int = 120
    min_people: int = 1
    max_people: int = 8
    background: str = "plain"

    def source(self, root: Path, name: str) -> SyntheticCrowd:
        """The set under ``root``, in a folder named by its arguments (a changed flag never reuses a stale set)."""
        folder = (
            f"{name}-{self.width}x{self.height}-{self.min_people}-{self.max_people}-{self.background}"
            f"-n{self.n}-s{self.seed}"
        )
        return SyntheticCrowd(
            root=str(root / folder),
            n=self.n,
            seed=self.seed,
            width=self.width,
            height=self.height,
            min_people=self.min_people,
            max_people=self.max_people,
            background=self.background,
            name=name,
        )


def set_stats(source: SyntheticCrowd) -> dict:
    """How hard a generated set is, from its annotation: people per image, the share of them occluded (under
    95% visible) and the share ignored (under 10% visible)."""
    import json

    iter(source)  # generates the set if no arm has read it yet
    people = []
    with open(source.root / "annotation.odgt") as f:
        for line in f:
            people.append([g for g in json.loads(line)["gtboxes"] if g["tag"] == "person"])
    every = [g for image in people for g in image]
    return {
        "images": len(people),
        "people_per_image": round(len(every) / max(len(people), 1), 2),
        "occluded": round(sum(g["extra"]["occ"] for g in every) / max(len(every), 1), 3),
        "ignored": round(sum(g["extra"]["ignore"] for g in every) / max(len(every), 1), 3),
    }


def data_sets(train_images: int, eval_images: int) -> dict[str, SetSpec]:
    """The training set and the two held-out sets.

    In domain: the training distribution (160x120, 1-8 people, plain background), other seeds. Out of domain:
    denser crowds (9-16 people, hence more occlusion), a larger image of another aspect ratio (224x160, more
    image tokens) and a cluttered background (distractor shapes the training images never hold).
    """
    return {
        "train": SetSpec(train_images, seed=0),
        "in_domain": SetSpec(eval_images, seed=1001),
        "out_of_domain": SetSpec(
            eval_images, seed=2002, width=224, height=160, min_people=9, max_people=16, background="clutter"
        ),
    }


@dataclass(frozen=True)
class Budget:
    """What every arm gets alike, and the GRPO settings."""

    steps: int
    """Optimiser steps of every trained arm."""
    batch_size: int
    """Images per step (SFT: targets; GRPO: prompts, each with ``group_size`` completions)."""
    group_size: int
    """GRPO completions per prompt (G)."""
    max_new_tokens: int
    """Longest GRPO completion."""
    temperature: float
    """GRPO sampling temperature."""
    beta: float
    """GRPO KL weight (full fine-tuning: a frozen copy of the base is the reference)."""
    lr: float
    """AdamW learning rate of the GRPO arms."""
    sft_lr: float
    """AdamW learning rate of the SFT arm."""
    eval_max_new_tokens: int
    """Longest greedy answer in evaluation (the densest out-of-domain answers need ~25 tokens a person)."""
    eval_batch_size: int
    """Images per evaluation batch."""
    look_weight: float = 1.0
    """Weight of the look reward in the ``dip_r1`` arm (the other arms weight it 0)."""
    iou_weighted: bool = False
    """The accuracy reward counts a match by its IoU instead of 1 (``PrecisionRecallReward(iou_weighted)``)."""
    look_credit: bool = True
    """The look reward's advantage reaches only the tokens of the look block (``RewardSuite(credit)``)."""
    look_resolve: bool = True
    """The look reward counts only as much as the answer is right inside the looked regions
    (``LookReward(resolve)``)."""


def prompt_builder() -> DetectionPromptBuilder:
    """The prompts the tiny bases are trained with (their short system prompt)."""
    return DetectionPromptBuilder(system_prompt=TINY_SYSTEM_PROMPT)


def reward_weights(arm: str, look_weight: float = 1.0) -> dict[str, float]:
    """The arm's reward weights, ``REWARD_WEIGHTS`` with the ``dip_r1`` arm's look weight set."""
    weights = dict(REWARD_WEIGHTS[arm])
    if arm == "dip_r1":
        weights["look"] = look_weight
    return weights


def reward_suite(arm: str, budget: Budget) -> RewardSuite:
    """The three rewards with the arm's weights."""
    rewards = {
        "format": FormatReward(),
        "look": LookReward(resolve=budget.look_resolve),
        "accuracy": PrecisionRecallReward(iou_weighted=budget.iou_weighted),
    }
    credit = {"look": "look"} if arm == "dip_r1" and budget.look_credit else {}
    return RewardSuite(rewards, reward_weights(arm, budget.look_weight), credit=credit)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


@contextlib.contextmanager
def _quiet_stdout():
    """Rich tables and Lightning notices to stderr: this script's stdout is its JSON."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _module(arm: str, path: str | Path, budget: Budget, *, evaluation: bool = False):
    """The arm's LightningModule on the checkpoint at ``path`` (vision tower trainable: the base starts from
    random weights, so its vision features are as much to learn as the rest)."""
    from dip_r1.module import GRPOModule
    from dip_r1.sft import SFTModule

    spec = PolicySpec(str(path), freeze_vision=False)
    if arm == "sft" and not evaluation:
        return SFTModule(spec, optimizer=functools.partial(torch.optim.AdamW, lr=budget.sft_lr))
    g = budget.group_size
    return GRPOModule(
        spec,
        rewards=reward_suite(arm if arm in REWARD_WEIGHTS else "dip_r1", budget),
        group_size=g,
        sampling=SamplingConfig(
            max_new_tokens=budget.eval_max_new_tokens if evaluation else budget.max_new_tokens,
            temperature=budget.temperature,
        ),
        loss=LossConfig(beta=0.0 if evaluation else budget.beta),
        micro_batch_size=g * max(1, 16 // g),  # whole groups: each prompt is run once, shared by its group
        optimizer=functools.partial(torch.optim.AdamW, lr=budget.lr, weight_decay=0.0),
    )


def train_arm(
    arm: str, base: Path, train: SyntheticCrowd, budget: Budget, seed: int, out: Path, logs: Path
) -> dict:
    """Train one arm from ``base`` and save its policy to ``out`` (weights and processor files, loadable by
    ``policy.path``); its metrics go to ``logs/metrics.csv``. Returns ``{"seconds"}``."""
    from lightning.pytorch.loggers import CSVLogger

    start = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    L.seed_everything(seed, verbose=False)
    if arm == "base":
        shutil.copytree(base, out)  # the untrained policy, as a folder like the others
        return {"seconds": round(time.perf_counter() - start, 1)}
    module = _module(arm, base, budget)
    # The same seed gives every arm of a seed the same images in the same order.
    data = DetectionDataModule(
        train=[train], prompt_builder=prompt_builder(), batch_size=budget.batch_size, seed=seed
    )
    data.connect(module.processor, **module.data_spec())
    trainer = _trainer(
        max_steps=budget.steps,
        limit_val_batches=0,
        log_every_n_steps=1,
        logger=CSVLogger(logs.parent, name=logs.name, version=""),
    )
    with _quiet_stdout():
        trainer.fit(module, data)
    module.policy.save_pretrained(out)
    copy_processor_files(base, out)  # not the base's own scores and README
    return {"seconds": round(time.perf_counter() - start, 1)}


def evaluate(policy: Path, sets: dict[str, SyntheticCrowd], picture: SyntheticCrowd, budget: Budget) -> dict:
    """Greedy answers of the policy at ``policy`` on each held-out set (``dip-r1 validate``'s code path) and on
    the first image of ``picture``.

    Returns ``{"metrics": {set: {metric: value}}, "answers": {set: {stat: value}}, "picture": Prediction}``.
    """
    module = _module("dip_r1", policy, budget, evaluation=True)
    data = DetectionDataModule(
        val=list(sets.values()), prompt_builder=prompt_builder(), batch_size=budget.eval_batch_size
    )
    data.connect(module.processor, **module.data_spec())
    with _quiet_stdout():
        (logged,) = _trainer(logger=False).validate(module, data, verbose=False)
    metrics, answers = (
        {name: {m: float(logged.get(f"val/{name}/{m}", float("nan"))) for m in keys} for name in sets}
        for keys in (METRICS, ANSWER_STATS)
    )
    one = DetectionDataModule(predict=[picture], prompt_builder=prompt_builder(), batch_size=1)
    one.connect(module.processor, **module.data_spec())
    with _quiet_stdout():
        ((prediction, *_),) = _trainer(logger=False, limit_predict_batches=1).predict(module, one)
    return {"metrics": metrics, "answers": answers, "picture": prediction}
