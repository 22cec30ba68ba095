"""How well a base reads its crops: held-out F1 with the zoom look and with the text look on the same images, and
how many of the boxes read off a crop (``"region": k``) match a person, against those given in the image frame,
and how many boxes repeat an earlier one of the same answer.

    python bench/zoom_reading.py --model data/tiny-qwen3_vl-zoom [--n 64] [--size 320x240] [--max-pixels 22000]
        [--figure-scale 1] [--groups 0] [--seed 1000]

``--figure-scale 0.5`` draws figures half as tall (small against the pixel budget: the full view loses them and
a crop gives them back); ``--groups`` stands them in tight groups.

The held-out sets are ``dip_r1.pretrain``'s (seeds 1000 and 1001, 1-3 and 6-10 people), greedy answers: the sets
a base's stages are chosen on. ``--seed S`` draws the two sets from seeds ``S`` and ``S + 1`` instead (e.g. 3000:
test sets nobody chose anything on). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common
import torch

from dip_r1.boxes import box_iou
from dip_r1.config import SamplingConfig
from dip_r1.data.synthetic import SceneStyle
from dip_r1.evaluation import DetectionEvaluator, predict
from dip_r1.models import PolicySpec, load_policy
from dip_r1.tiny.curriculum import HELD_OUT_SEED, batches, held_out_sets, stage_source
from dip_r1.tokens import TokenIds


def duplicate_share(predictions, iou: float = 0.5) -> float:
    """The share of answer boxes (image frame, regions resolved) that overlap an earlier box of the same answer
    at IoU ``iou`` or more: a person answered twice (e.g. off a crop and again in the image frame), which the
    one-to-one matching counts as a false positive."""
    twice = total = 0
    for p in predictions:
        answer = p.parsed.answer
        if answer is None or not len(answer):
            continue
        overlap = box_iou(answer.float(), answer.float()).tril(diagonal=-1)
        twice += int((overlap >= iou).any(dim=1).sum())
        total += len(answer)
    return twice / total if total else 0.0


def box_matches(predictions) -> dict[str, list[int]]:
    """``{"region": [matched, all], "image": [...]}``: answer boxes (image frame, regions resolved) whose best
    IoU with a true box is at least 0.5, split by whether they were read off a crop."""
    out = {"region": [0, 0], "image": [0, 0]}
    for p in predictions:
        answer, truth = p.parsed.answer, torch.as_tensor(p.target["boxes"]).float().reshape(-1, 4)
        if answer is None or not len(answer):
            continue
        regions = p.parsed.regions or [None] * len(answer)
        best = box_iou(answer.float(), truth).max(dim=1).values if len(truth) else torch.zeros(len(answer))
        for region, iou in zip(regions, best.tolist()):
            kind = out["region" if region else "image"]
            kind[0] += int(iou >= 0.5)
            kind[1] += 1
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=64, help="images per held-out set")
    p.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the held-out images")
    p.add_argument("--figure-scale", type=float, default=1.0, help="figure heights times this, in (0, 2]")
    p.add_argument("--groups", type=int, default=0, help="figures stand in this many tight groups")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="the sets' seeds: this one and the next")
    p.add_argument("--max-pixels", type=int, default=22000, help="the prompt builder's pixel budget")
    p.add_argument(
        "--zoom-max-pixels", type=int, default=None, help="a crop's pixel budget (default: the prompt's)"
    )
    p.add_argument("--max-new-tokens", type=int, default=400)
    p.add_argument("--cache", default="data/pretrain-sets")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size must be WIDTHxHEIGHT, got {args.size!r}")
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model} holds no checkpoint (no config.json)")
    if args.seed < 0:  # numpy's generators take no negative seed
        p.error(f"--seed must be at least 0, got {args.seed}")
    for flag, value in (
        ("--n", args.n),
        ("--max-pixels", args.max_pixels),
        ("--zoom-max-pixels", args.zoom_max_pixels),
    ):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    try:  # the generator's own checks, named by their flags
        SceneStyle(figure_scale=args.figure_scale, groups=args.groups)
    except ValueError as exc:
        p.error(f"--{str(exc).replace('_', '-')}")
    if min(width, height) < 1:
        p.error(f"--size must be positive, got {args.size!r}")
    torch.set_num_threads(args.threads)
    _common.flush_denormals()
    start = time.perf_counter()
    model, processor = load_policy(args.model, freeze_vision=False)
    model.eval()
    coordinates = PolicySpec(args.model).data_spec(processor)["coordinates"]
    tokens = TokenIds.of(model, processor)
    out: dict = {"model": args.model, "size": [width, height], "max_pixels": args.max_pixels, "n": args.n}
    out["zoom_max_pixels"] = args.zoom_max_pixels
    out["figure_scale"], out["groups"], out["seed"] = args.figure_scale, args.groups, args.seed
    sets = held_out_sets(args.n, width, height, args.figure_scale, args.groups)
    for i, (name, stage) in enumerate(sets.items()):
        source = stage_source(Path(args.cache), "eval", stage, args.seed + i)
        for mode in ("zoom", "text"):
            sampling = SamplingConfig(
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                look_mode=mode,
                zoom_max_pixels=args.zoom_max_pixels,
            )
            evaluator, predictions = DetectionEvaluator(), []
            for batch in batches(processor, coordinates, [source], 16, 0, False, args.max_pixels, True):
                found = predict(model, processor, batch, sampling, tokens)
                for q in found:
                    q.target = {**q.target, "dataset": "held_out"}
                evaluator.update(found)
                predictions += found
            row = evaluator.compute()["held_out"]
            result = {k: round(float(row[k]), 3) for k in ("precision", "recall", "f1", "format_valid")}
            result["crops_per_image"] = round(sum(len(q.crops) for q in predictions) / len(predictions), 3)
            result["duplicate_share"] = round(duplicate_share(predictions), 3)
            if mode == "zoom":
                matches = box_matches(predictions)
                for kind, (hit, total) in matches.items():
                    result[f"{kind}_boxes"] = total
                    result[f"{kind}_box_precision"] = round(hit / total, 3) if total else None
            out[f"{name}/{mode}"] = result
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
