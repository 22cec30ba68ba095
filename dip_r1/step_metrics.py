"""What a GRPO step logs about its completions: every reward's mean and spread, the share of groups a reward
gives no signal, lengths, truncation, speed and, in zoom mode, the crops shown."""

from __future__ import annotations

import torch
from torch import Tensor

from dip_r1 import grpo


def step_metrics(
    scores: dict[str, Tensor], rollouts: list, group_size: int, stats: dict[str, float], elapsed: float
) -> dict[str, float]:
    """``{"train/<key>": value}`` for one step.

    ``scores``: ``"total"`` and each reward, one value per completion of ``rollouts`` (the step's
    :class:`~dip_r1.rollout.Rollout` objects, in order); ``stats``: the loss's own figures (loss, KL, clip
    ratio, entropy, ...), logged as they are.

    >>> from types import SimpleNamespace as NS
    >>> r = NS(lengths=torch.tensor([3, 5]), truncated=torch.tensor([False, True]),
    ...        crops_per_completion=torch.tensor([2, 0]), crops=[[], []])
    >>> m = step_metrics({"total": torch.tensor([1.0, 1.0])}, [r], 2, {"loss": 0.5}, 2.0)
    >>> m["train/reward"], m["train/zero_std_ratio"], m["train/truncated_ratio"], m["train/zoom_crops"]
    (1.0, 1.0, 0.5, 1.0)
    """
    log = {f"train/{k}": float(v) for k, v in stats.items()}
    for name, values in scores.items():
        key = "train/reward" if name == "total" else f"train/reward_{name}"
        log[key] = values.float().mean().item()
        log[f"{key}/std"] = values.float().std(unbiased=False).item()
        # The fraction of groups whose G values of this reward are all equal: such a reward gives no signal.
        suffix = "" if name == "total" else f"_{name}"
        log[f"train/zero_std_ratio{suffix}"] = grpo.zero_std_mask(values, group_size).float().mean().item()
    lengths = torch.cat([r.lengths for r in rollouts]).float()  # sampled tokens: crop tokens are not
    log["train/completion_length"] = lengths.mean().item()
    log["train/truncated_ratio"] = torch.cat([r.truncated for r in rollouts]).float().mean().item()
    log["train/tokens_per_s"] = lengths.sum().item() / max(elapsed, 1e-9)
    log["train/step_s"] = elapsed
    if any(r.crops is not None for r in rollouts):  # zoom: crops shown per completion
        log["train/zoom_crops"] = torch.cat([r.crops_per_completion for r in rollouts]).float().mean().item()
    return log
