"""The experiment of issue 10: from one base, five arms with the same budget, evaluated on two held-out sets.

    python bench/evidence.py --seeds 3 [--base data/tiny-qwen3_vl-seeing] [--out runs/evidence] [--quick]

Arms: ``base`` (no training), ``sft`` (SFTModule continued on the training set), ``dip_r1`` (GRPO, format +
look + accuracy; the look reward resolved by the answer and credited to ``<look>``, as in the default reward
suite: ``--no-look-credit --no-look-resolve`` score it as first defined), ``no_look`` (GRPO, format +
accuracy), ``accuracy_only`` (GRPO, accuracy alone). Every trained
arm of a seed sees the same training images in the same order for the same number of optimiser steps, at the
same learning rate by default. All arms fine-tune every weight, the vision tower included: the tiny base is a
few million parameters trained from random weights, so LoRA would save nothing and its vision features are as
much to learn as the rest. GRPO's reference for the KL term (``--beta``) is a frozen copy of the base.
Held-out sets: ``in_domain`` (the training distribution, other seeds) and ``out_of_domain`` (denser crowds,
another image size, a cluttered background). Metrics come from greedy answers through ``GRPOModule``'s
validation, the code of ``dip-r1 validate``.

Writes under ``--out``: ``results.json`` (``{arm: {set: {metric: {"mean", "std", "seeds"}}}}``),
``diagnostics.json`` (per arm: rewards' first and last fifths, zero-std ratios, completion length,
truncation, KL, times; the budget and the sets), ``results.md``, ``evidence.png``, each arm's policy as
``<arm>/seed<k>/`` (a transformers folder), the CSV logs under ``logs/<arm>/seed<k>/`` and the data under
``data/``. Progress goes to stderr, one JSON summary line to stdout. Any policy folder evaluates on another
set, e.g. the quickstart's validation set (the quickstart recipe sets the tiny bases' short system prompt)::

    dip-r1 validate --config recipes/quickstart.yaml --model.init_args.policy.path runs/evidence/dip_r1/seed0

The base is built with ``dip_r1.pretrain.pretrain`` when ``--base`` holds no checkpoint (``--quick``: a random
tiny one under ``--out`` instead, as the quick run's results are not judged).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import _evidence_report as report
import _evidence_run as run
import torch

from dip_r1.cli import _subnormals_flushed
from dip_r1.models import has_checkpoint

DEFAULT_BASE = "data/tiny-qwen3_vl-seeing"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="seeds 0..N-1: each sets the training images' order and GRPO's sampling",
    )
    p.add_argument("--base", default=DEFAULT_BASE, help="base checkpoint folder (built when missing)")
    p.add_argument("--out", default="runs/evidence", help="output folder")
    p.add_argument("--quick", action="store_true", help="a tiny run of every step, in under a minute")
    p.add_argument("--arms", default=",".join(run.ARMS), help="comma-separated subset of the arms")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps of every trained arm")
    p.add_argument("--batch-size", type=int, default=2, help="images per step, every arm")
    p.add_argument("--group-size", type=int, default=8, help="GRPO completions per image (G)")
    p.add_argument(
        "--max-new-tokens", type=int, default=320, help="longest GRPO completion (8 people: ~300 tokens)"
    )
    p.add_argument("--temperature", type=float, default=1.0, help="GRPO sampling temperature")
    p.add_argument(
        "--beta", type=float, default=0.04, help="GRPO KL weight (0: no reference pass, KL not measured)"
    )
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the GRPO arms")
    p.add_argument(
        "--look-weight", type=float, default=1.0, help="weight of the look reward in the dip_r1 arm"
    )
    p.add_argument(
        "--iou-weighted", action="store_true", help="the accuracy reward counts each match by its IoU"
    )
    p.add_argument(
        "--look-credit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the look reward's advantage reaches only the look block's tokens (RewardSuite(credit))",
    )
    p.add_argument(
        "--look-resolve",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the look reward times the answer's accuracy inside the looked regions (LookReward(resolve))",
    )
    p.add_argument("--sft-lr", type=float, default=1e-4, help="AdamW learning rate of the SFT arm")
    p.add_argument("--train-images", type=int, default=400, help="images of the training set")
    p.add_argument("--eval-images", type=int, default=64, help="images of each held-out set")
    p.add_argument(
        "--eval-max-new-tokens", type=int, default=576, help="longest greedy answer (16 people: ~550 tokens)"
    )
    p.add_argument("--eval-batch-size", type=int, default=16, help="images per evaluation batch")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (tiny models: more threads only wait)"
    )
    args = p.parse_args(argv)
    if args.quick:  # every stage runs, on almost nothing: the test checks the outputs, not the figures
        args.steps, args.batch_size, args.group_size, args.max_new_tokens = 2, 1, 2, 12
        args.train_images, args.eval_images, args.eval_max_new_tokens, args.eval_batch_size = 4, 2, 12, 4
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = set(args.arms) - set(run.ARMS)
    if unknown:
        p.error(f"unknown arms {sorted(unknown)}: choose from {', '.join(run.ARMS)}")
    return args


def ensure_base(path: Path, quick: bool, out: Path) -> tuple[Path, str]:
    """The base checkpoint, built when missing; and how it came to be."""
    if has_checkpoint(path):
        return path, "given"
    if quick:  # never at ``path``: a random model must not stand where the real base is expected
        from dip_r1.tiny import save_tiny

        return save_tiny(out / "base-random", "qwen3_vl", "xs"), "random tiny (--quick, no base found)"
    from dip_r1 import pretrain

    with run._quiet_stdout():
        pretrain.pretrain(path)
    return path, "dip_r1.pretrain.pretrain"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads, flushed = torch.get_num_threads(), _subnormals_flushed()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random-init models produce subnormals, 10x slower on x86
    try:
        return experiment(args, argv)
    finally:  # process-wide settings: a caller in Python gets its own back
        torch.set_num_threads(threads)
        torch.set_flush_denormal(flushed)


def experiment(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Run the arms, evaluate them, write the outputs; return the printed summary."""
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, base_origin = ensure_base(Path(args.base), args.quick, out)
    budget = run.Budget(
        steps=args.steps,
        batch_size=args.batch_size,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        beta=args.beta,
        lr=args.lr,
        sft_lr=args.sft_lr,
        eval_max_new_tokens=args.eval_max_new_tokens,
        eval_batch_size=args.eval_batch_size,
        look_weight=args.look_weight,
        iou_weighted=args.iou_weighted,
        look_resolve=args.look_resolve,
        look_credit=args.look_credit,
    )
    specs = run.data_sets(args.train_images, args.eval_images)
    sources = {name: spec.source(out / "data", name) for name, spec in specs.items()}
    held_out = {name: sources[name] for name in run.SETS}

    per_seed: dict = {arm: {} for arm in args.arms}
    answers: dict = {arm: {} for arm in args.arms}
    seconds: dict = {arm: {} for arm in args.arms}
    pictures: dict = {}
    for seed in range(args.seeds):
        for arm in args.arms:
            policy, logs = out / arm / f"seed{seed}", out / "logs" / arm / f"seed{seed}"
            trained = run.train_arm(arm, base, sources["train"], budget, seed, policy, logs)
            if arm == "base" and seed > 0:  # untrained and greedy: every seed would decode the same answers
                per_seed[arm][seed], seconds[arm][seed] = per_seed[arm][0], {"train": 0.0, "eval": 0.0}
                answers[arm][seed] = answers[arm][0]
                continue
            t = time.perf_counter()
            evaluated = run.evaluate(policy, held_out, sources["out_of_domain"], budget)
            per_seed[arm][seed], answers[arm][seed] = evaluated["metrics"], evaluated["answers"]
            seconds[arm][seed] = {"train": trained["seconds"], "eval": round(time.perf_counter() - t, 1)}
            pictures.setdefault(arm, evaluated["picture"])  # seed 0's
            f1 = {s: round(v["f1"], 3) for s, v in evaluated["metrics"].items()}
            print(json.dumps({"seed": seed, "arm": arm, **seconds[arm][seed], "f1": f1}), file=sys.stderr)

    table = report.results(per_seed, args.arms, run.SETS, run.METRICS)
    logs = {
        arm: [report.read_log(out / "logs" / arm / f"seed{k}" / "metrics.csv") for k in range(args.seeds)]
        for arm in args.arms
    }
    diagnostics = {
        "base": {"path": str(base), "origin": base_origin},
        "budget": vars(budget),
        "sets": {name: {**vars(spec), **run.set_stats(sources[name])} for name, spec in specs.items()},
        # box spamming, repeats and looking show here: what the F1 alone does not say
        "answers": report.results(answers, args.arms, run.SETS, run.ANSWER_STATS),
        "reward_weights": {arm: run.reward_weights(arm, args.look_weight) for arm in run.REWARD_WEIGHTS},
        # What each arm wrote for the figure's image: box spamming, lost format, truncation show here.
        "picture": {
            arm: {"image_id": p.target["image_id"], "completion": p.text} for arm, p in pictures.items()
        },
        "arms": {
            arm: {
                "train_seconds": report.summary([seconds[arm][k]["train"] for k in range(args.seeds)]),
                "eval_seconds": report.summary([seconds[arm][k]["eval"] for k in range(args.seeds)]),
                "training": report.mean_of([report.training_diagnostics(log) for log in logs[arm]]),
                "per_seed": [report.training_diagnostics(log) for log in logs[arm]],
            }
            for arm in args.arms
        },
    }
    (out / "results.json").write_text(json.dumps(table, indent=2))
    command = "python bench/evidence.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    diagnostics["command"] = command
    diagnostics["seconds"] = round(time.perf_counter() - start, 1)
    (out / "diagnostics.json").write_text(json.dumps(diagnostics, indent=2))
    (out / "results.md").write_text(report.markdown(table, diagnostics, command, run.SETS, run.METRICS))
    image = (
        Path(held_out["out_of_domain"].root) / "Images" / f"{pictures[args.arms[0]].target['image_id']}.jpg"
    )
    report.figure(logs, table, run.SETS, image, pictures).save(out / "evidence.png")
    summary = {
        "out": str(out),
        "seconds": diagnostics["seconds"],
        "f1": {arm: {s: table[arm][s]["f1"]["mean"] for s in run.SETS} for arm in args.arms},
        "never_varied": {
            arm: d["training"].get("never_varied", []) for arm, d in diagnostics["arms"].items()
        },
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
