"""Reward speed on a crowded scene: ms per group of G completions, parse included and apart.

Run: ``python bench/rewards.py`` (prints one JSON object). The scene: 150 ground-truth boxes and
10 ignore regions; each of the G = 8 completions answers with 150 boxes (most of the ground truth,
jittered, plus false positives) and looks at 3 regions.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from dip_r1.rewards import FormatReward, LookReward, PrecisionRecallReward, RewardSuite, parse_completion


def scene(rng: np.random.Generator, num_boxes: int, num_ignore: int, size: float) -> dict:
    xy = rng.uniform(0, size - 80, (num_boxes, 2))
    wh = rng.uniform(15, 80, (num_boxes, 2))
    gt = np.concatenate([xy, xy + wh], 1)
    ixy = rng.uniform(0, size - 120, (num_ignore, 2))
    ignore = np.concatenate([ixy, ixy + rng.uniform(40, 120, (num_ignore, 2))], 1)
    return {
        "boxes": torch.tensor(gt, dtype=torch.float32),
        "ignore": torch.tensor(ignore, dtype=torch.float32),
        "image_size": (size, size),
    }


def completion(rng: np.random.Generator, gt: np.ndarray, num_boxes: int, size: float) -> str:
    keep = gt[rng.permutation(len(gt))[: int(0.9 * num_boxes)]]
    found = keep + rng.normal(0, 3, keep.shape)
    xy = rng.uniform(0, size - 80, (num_boxes - len(found), 2))
    extra = np.concatenate([xy, xy + rng.uniform(15, 80, xy.shape)], 1)
    boxes = np.concatenate([found, extra]).round(1)
    answer = json.dumps([{"bbox_2d": b.tolist(), "label": "person"} for b in boxes])
    look = json.dumps(rng.uniform(0, size / 2, (3, 2)).round().repeat(2, 1).__add__([0, 0, 60, 60]).tolist())
    think = "A dense crowd; several people overlap near the centre. " * 4
    return f"<think>{think}</think>\n<look>{look}</look>\n<answer>{answer}</answer>"


def timed(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each case, the cases interleaved run by run (after one warm-up) so
    that a busy moment of the shared CPU does not fall on a single case."""
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            runs[name].append((time.perf_counter() - start) * 1e3)
    return {f"ms_per_group_{name}": float(np.median(times)) for name, times in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=150)
    parser.add_argument("--ignore", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    size = 1000.0
    target = scene(rng, args.boxes, args.ignore, size)
    texts = [completion(rng, target["boxes"].numpy(), args.boxes, size) for _ in range(args.group_size)]
    parsed = [parse_completion(t) for t in texts]
    assert all(p.well_formed and len(p.answer) == args.boxes for p in parsed)
    suite, g = RewardSuite(), args.group_size
    rewards = {
        "format": FormatReward(),
        "look": LookReward(),
        "look_resolved": LookReward(resolve=True),  # the default suite's: the look times the answer inside it
        "accuracy": PrecisionRecallReward(),
    }
    cases = {
        "total": lambda: suite(texts, [target], g),
        "parse": lambda: [parse_completion(t) for t in texts],
        "rewards_parsed": lambda: suite(parsed, [target], g),
    }
    cases.update({name: (lambda r=reward: r(parsed, [target], g)) for name, reward in rewards.items()})
    result = {
        "benchmark": "rewards",
        "group_size": g,
        "pred_boxes": args.boxes,
        "gt_boxes": args.boxes,
        "ignore_regions": args.ignore,
        **timed(cases, args.repeats),
    }
    result.update(
        torch_threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__
    )
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
