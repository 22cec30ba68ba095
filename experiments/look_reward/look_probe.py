"""What the look reward goes with, inside GRPO's groups: sampled completions of a policy on training images.

    python experiments/look_reward/look_probe.py [--policy data/tiny-qwen3_vl-seeing] [--images 40] [--group-size 8]

Samples G completions per image (temperature 1, as the experiment's GRPO arms) from the policy on the
``bench/evidence.py`` training set (``recipes/evidence_synthetic.yaml``'s), scores them, and prints as JSON the
mean over groups of the within-group correlation between each look-reward variant and the completion's accuracy
reward, its precision, its recall and its number of look boxes. GRPO learns from differences inside a group, so
these correlations say what a reward pushes the policy towards (``docs/look_reward.md``: the look reward as
first defined went with having look boxes and against precision). Variants: ``look`` (as first defined: the
harmonic mean of focus and coverage), ``look_focus`` (focus alone) and ``look_resolved`` (times the answer's
accuracy inside the looked regions: the library's ``LookReward()``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dip_r1.config import SamplingConfig
from dip_r1.data import DetectionDataModule
from dip_r1.data.prompts import DetectionPromptBuilder
from dip_r1.data.sources import SyntheticCrowd
from dip_r1.models import PolicySpec
from dip_r1.module import GRPOModule
from dip_r1.rewards import functional as F
from dip_r1.rewards import parse_completion
from dip_r1.rollout import sample_completions
from dip_r1.tiny.curriculum import TINY_SYSTEM_PROMPT


def completion_stats(parsed, target) -> dict[str, list[float]]:
    """Per completion of one group: each look variant, accuracy, precision, recall, look boxes."""
    answers, looks = [c.answer for c in parsed], [c.look for c in parsed]
    size = target["image_size"]
    out = {"look": F.look_reward(answers, looks, size).tolist()}
    out["look_focus"] = F.look_terms(answers, looks, size)[0].tolist()
    gt, ignore = target["boxes"], target.get("ignore")
    resolved = [F.inspection_accuracy(a, lk, gt, ignore) for a, lk in zip(answers, looks)]
    out["look_resolved"] = [v * r for v, r in zip(out["look"], resolved)]
    out["accuracy"] = [F.precision_recall_reward(a, gt, ignore) for a in answers]
    out["precision"] = [F.precision_recall_reward(a, gt, ignore, recall_weight=0) for a in answers]
    out["recall"] = [F.precision_recall_reward(a, gt, ignore, precision_weight=0) for a in answers]
    out["look_boxes"] = [0.0 if lk is None else float(len(lk)) for lk in looks]
    return out


def within_group_correlation(groups: list[dict[str, list[float]]], a: str, b: str) -> dict:
    """Mean Pearson correlation of ``a`` and ``b`` over the groups where both vary, and how many those are."""
    values = [float(np.corrcoef(g[a], g[b])[0, 1]) for g in groups if np.std(g[a]) > 0 and np.std(g[b]) > 0]
    return {"mean": round(float(np.mean(values)), 3) if values else None, "groups": len(values)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="data/tiny-qwen3_vl-seeing", help="policy folder")
    p.add_argument("--images", type=int, default=40, help="training images, one group each")
    p.add_argument("--group-size", type=int, default=8, help="completions per image (G)")
    p.add_argument("--max-new-tokens", type=int, default=320, help="longest completion")
    p.add_argument("--data", default="data/evidence", help="where the experiment's sets are (or go)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    module = GRPOModule(
        PolicySpec(args.policy, freeze_vision=False), group_size=args.group_size, sampling=sampling
    )
    module.configure_model()
    # the training set of recipes/evidence_synthetic.yaml
    source = SyntheticCrowd(
        str(Path(args.data) / "train-s0-n400"),
        n=400,
        seed=0,
        width=160,
        height=120,
        min_people=1,
        max_people=8,
    )
    prompts = DetectionPromptBuilder(system_prompt=TINY_SYSTEM_PROMPT, max_pixels=22000)
    data = DetectionDataModule(train=[source], prompt_builder=prompts, batch_size=4, seed=args.seed)
    data.connect(module.processor, **module.data_spec())
    groups: list[dict[str, list[float]]] = []
    for batch in data.train_dataloader():
        if len(groups) >= args.images:
            break
        batch = data.on_before_batch_transfer(batch, 0)  # what the Trainer does with a loader's batch
        with torch.no_grad():
            rollout = sample_completions(
                module.policy.eval(), batch["inputs"], sampling, module.token_ids, group_size=args.group_size
            )
        texts = module.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        parsed = [parse_completion(t) for t in texts]
        for b, target in enumerate(batch["targets"]):
            groups.append(completion_stats(parsed[b * args.group_size : (b + 1) * args.group_size], target))
    groups = groups[: args.images]
    keys = ("accuracy", "precision", "recall", "look_boxes")
    result = {
        "policy": args.policy,
        "groups": len(groups),
        "group_size": args.group_size,
        "means": {k: round(float(np.mean([v for g in groups for v in g[k]])), 3) for k in groups[0]},
        "within_group_correlation": {
            name: {k: within_group_correlation(groups, name, k) for k in keys}
            for name in ("look", "look_focus", "look_resolved")
        },
        "look_boxes_vs_precision": within_group_correlation(groups, "look_boxes", "precision"),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
