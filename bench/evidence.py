"""Does DIP-R1 beat SFT, and does the zoom look beat the text look? Arms from one base, tested in and out of domain.

    python bench/evidence.py --seeds 3 [--config recipes/evidence_synthetic.yaml] [--arms ...] [--out runs/evidence]
    python bench/evidence.py --config recipes/evidence_crowdhuman.yaml \\
        --model.init_args.policy.path /models/Qwen2.5-VL-3B-Instruct

The experiment is a ``dip-r1 fit`` recipe: ``model`` the GRPO settings every GRPO arm shares, ``data.train``
the training images, ``data.val`` the validation set every choice is made on (SFT's checkpoint, the levers,
the budget), ``data.test`` the test sets, each source's ``name`` the set's (``control_*`` sets are diagnostics,
evaluated with the untrained arms only), ``trainer.max_steps`` the GRPO arms' optimiser steps. Dotted flags
(``--model.init_args.loss.beta 0.1``) override the recipe as on ``dip-r1``'s command line.

Arms (``_evidence_arms.ARMS``): ``base``, ``sft``, ``dip_r1`` (text look), ``base_zoom``, ``sft_zoom``,
``dip_r1_zoom``, ``no_look_zoom`` by default; ``--arms`` adds ``no_look`` and ``accuracy_only``. A zoom arm is
its text arm with ``sampling.look_mode: zoom``; on a dip_r1 without the zoom look it is skipped, saying why.
GRPO arms of a seed share the steps, the images and their order, and every setting but the rewards' weights.
SFT arms train on the same images until the validation F1@0.5 has not improved for ``--sft-patience``
validations (one every ``--sft-val-every`` steps), and for at least the training time of the seed's slowest
GRPO arm; the best validation checkpoint is their policy.

Writes under ``--out``: ``results.json`` (``{arm: {set: {metric: {"mean", "std", "seeds"}}}, "comparisons":
{"A - B": {set: {"difference", "low", "high", ...}}}, "splits": {...}}``: paired bootstrap 95% intervals of
F1@0.5 over the test images, seeds pooled), ``diagnostics.json``, ``results.md``, ``evidence.png``, and per arm
and seed ``<arm>/seed<k>/``: the policy (a folder ``policy.path`` takes), the ``fit.yaml`` it was trained from
and a ``validate.yaml`` with which ``dip-r1 validate --config <arm>/seed<k>/validate.yaml --data.val '[...]'``
evaluates it on any source as the experiment did (prompt, pixel budget, look mode, answer length). Progress
goes to stderr as JSON lines, one JSON summary to stdout.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

import _common
import _evidence_arms as arms
import _evidence_jobs as jobs
import _evidence_plan as plan
import _evidence_report as report
import _evidence_run as run
import _evidence_stats as stats
import torch

from dip_r1.lightning_cli import subnormals_flushed

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "evidence_synthetic.yaml"
METRICS = ("precision", "recall", "f1", "ap50", "ap", "mr2", "format_valid", "look_boxes", "crops")
"""Per arm and set; ``crops``: crops shown per answer (0 where the look does not zoom)."""
ANSWER_STATS = ("duplicate_ratio", "look_boxes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    aliases = ", ".join(f"{k} ({v[2:]})" for k, v in plan.ALIASES.items())
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"Any --<recipe key> VALUE overrides the recipe; short forms: {aliases}.",
    )
    p.add_argument("--config", default=str(RECIPE), help="the experiment's recipe (a dip-r1 fit config)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1: the images' order and the sampling")
    p.add_argument("--out", default="runs/evidence", help="output folder")
    p.add_argument("--quick", action="store_true", help="a tiny run of every step, in under a minute")
    p.add_argument(
        "--arms", default=",".join(arms.DEFAULT_ARMS), help=f"comma-separated, of {', '.join(arms.ARMS)}"
    )
    p.add_argument("--base", help="base checkpoint (the recipe's model.init_args.policy.path)")
    p.add_argument("--steps", type=int, help="GRPO optimiser steps (the recipe's trainer.max_steps)")
    p.add_argument("--sft-lr", type=float, default=1e-4, help="AdamW learning rate of the SFT arms")
    p.add_argument(
        "--sft-val-every",
        type=int,
        default=200,
        help="SFT: validate every this many steps (synthetic: an epoch)",
    )
    p.add_argument(
        "--sft-patience", type=int, default=2, help="SFT: stop after this many validations without a new best"
    )
    p.add_argument("--sft-max-steps", type=int, default=5000, help="SFT: stop here in any case")
    p.add_argument(
        "--sft-min-seconds",
        type=float,
        default=0.0,
        help="SFT: train at least this long (and as the slowest GRPO arm)",
    )
    p.add_argument(
        "--grpo-val-every",
        type=int,
        default=0,
        help="GRPO: validate every N steps (the budget is chosen there)",
    )
    p.add_argument(
        "--eval-max-new-tokens",
        type=int,
        default=768,
        help="longest greedy answer (24 people: ~600, ~700 with regions)",
    )
    p.add_argument("--eval-batch-size", type=int, default=16, help="images per evaluation batch")
    p.add_argument(
        "--look-weight", type=float, default=1.0, help="weight of the look reward where it is used"
    )
    p.add_argument(
        "--look-credit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the look reward's advantage reaches only the <look> tokens (RewardSuite(credit); no: credit={})",
    )
    p.add_argument(
        "--look-resolve",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the look reward times the answer's accuracy inside the looked regions (LookReward(resolve))",
    )
    p.add_argument(
        "--iou-weighted", action="store_true", help="the accuracy reward counts each match by its IoU"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (tiny models: more threads only wait)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes running arms side by side; 1: in this process (default: on a CPU recipe the cores, at "
        "most 2, which halves the wall time on 2 cores; else 1, one model per accelerator)",
    )
    args, rest = p.parse_known_args(argv)
    try:
        args.overrides = plan.overrides(rest)
    except ValueError as exc:
        p.error(str(exc))
    if args.quick:  # every stage runs, on almost nothing: the test checks the outputs, not the figures
        args.steps, args.eval_max_new_tokens, args.eval_batch_size = 2, 12, 4
        args.sft_val_every, args.sft_patience, args.sft_max_steps = 1, 1, 3
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = set(args.arms) - set(arms.ARMS)
    if unknown:
        p.error(f"unknown arms {sorted(unknown)}: choose from {', '.join(arms.ARMS)}")
    if not Path(args.config).is_file():
        p.error(f"no recipe at {args.config}")
    if args.jobs is not None and args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads, flushed = torch.get_num_threads(), subnormals_flushed()
    torch.set_num_threads(args.threads)
    _common.flush_denormals()  # random-init models produce subnormals, 10x slower on x86
    try:
        return experiment(args, argv)
    finally:  # process-wide settings: a caller in Python gets its own back
        torch.set_num_threads(threads)
        torch.set_flush_denormal(flushed)


def experiment(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Run the arms, evaluate them, write the outputs; return the printed summary."""
    start_time = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = plan.load_recipe(args)
    if args.quick:
        plan.shrink(recipe, out)
    base, base_origin = plan.ensure_base(recipe, args.quick, out)
    ex = plan.Experiment(args, recipe, out)
    skipped = {name: why for name in args.arms if (why := arms.unavailable(arms.ARMS[name]))}
    for name, why in skipped.items():
        run.stderr({"arm": name, "skipped": why})
    names = [a for a in args.arms if a not in skipped]

    per_seed: dict = {a: {} for a in names}
    counts: dict = {a: {} for a in names}
    controls: dict = {a: {} for a in names if arms.ARMS[a].trains == "none"}
    records: dict = {a: {} for a in names}
    pictures: dict = {}  # seed 0's evaluations, for the figure
    grpo_seconds: dict[int, list[float]] = {k: [] for k in range(args.seeds)}  # the least an SFT arm trains

    def start(unit: jobs.Unit) -> tuple | None:
        if unit.arm in skipped:
            return None
        earlier = records[unit.arm][0]["evaluated"] if unit.seed else None
        return jobs.run_arm, ex, unit.arm, unit.seed, base, grpo_seconds[unit.seed], earlier

    def finish(unit: jobs.Unit, future) -> None:
        seed, name = unit
        if name in skipped:  # another seed of this arm failed while this one ran beside it (--jobs)
            run.remove(out / name, out / "logs" / name)
            return
        try:
            record = future.result()
        except Exception as exc:
            if arms.ARMS[name].look_mode == "text":
                raise
            # A zoom arm on a dip_r1 whose zoom look is not complete: the arm is left out, saying why (the
            # traceback goes to stderr), and the text arms run on.
            traceback.print_exception(exc, file=sys.stderr)
            text = " ".join(str(exc).split())  # one line, a long message cut in its middle
            text = text if len(text) <= 240 else f"{text[:80]} ... {text[-140:]}"
            skipped[name] = f"failed on this dip_r1: {type(exc).__name__}: {text}"
            run.remove(out / name, out / "logs" / name)  # no folder without a policy
            run.stderr({"arm": name, "skipped": skipped[name]})
            return
        if arms.ARMS[name].trains == "grpo":
            grpo_seconds[seed].append(record["seconds"])
        evaluated = record["evaluated"]
        per_seed[name][seed] = {s: evaluated["metrics"].get(s, {}) for s in ex.sets}
        counts[name][seed] = evaluated["counts"]
        if name in controls:
            controls[name][seed] = {s: evaluated["metrics"].get(s, {}) for s in ex.controls}
        if seed == 0:
            pictures[name] = evaluated
        else:  # what the figure does not need
            record["evaluated"] = {k: v for k, v in evaluated.items() if k not in ("predictions", "images")}
        records[name][seed] = record
        f1 = {s: stats.finite(per_seed[name][seed][s].get("f1"), 3) for s in ex.sets}
        progress = {"seed": seed, "arm": name, "train_s": record["seconds"], "eval_s": evaluated["seconds"]}
        run.stderr({**progress, "f1": f1, "s": round(time.perf_counter() - start_time, 1)})

    workers = args.jobs or jobs.default_jobs(recipe)
    jobs.run_units(jobs.units(names, args.seeds), names, start, finish, workers, args.threads)

    names = [a for a in names if a not in skipped]
    per_seed, counts = ({a: d[a] for a in names} for d in (per_seed, counts))
    controls = {a: v for a, v in controls.items() if a in names}
    pictures = {a: v for a, v in pictures.items() if a in names}
    table = stats.results(per_seed, ex.sets, METRICS)
    splits = {
        "train": recipe["data"]["train"],
        "validation": ex.validation,
        "test": {
            s: [x for x in recipe["data"]["test"] if x.get("init_args", {}).get("name") == s] for s in ex.sets
        },
        "controls": {
            s: [x for x in recipe["data"]["test"] if x.get("init_args", {}).get("name") == s]
            for s in ex.controls
        },
        "chosen_on": "validation: SFT's checkpoint (early stopping); the budget and levers are chosen there too",
    }
    comparisons = stats.comparisons(counts, arms.COMPARISONS, ex.sets)
    results = {**table, "comparisons": comparisons, "splits": splits}
    (out / "results.json").write_text(json.dumps(results, indent=2))

    logs = {
        a: [report.read_log(out / "logs" / a / f"seed{k}" / "metrics.csv") for k in range(args.seeds)]
        for a in names
    }
    command = "python bench/evidence.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    diagnostics = {
        "command": command,
        "base": {"path": base, "origin": base_origin},
        "skipped_arms": skipped,
        "sets": stats.set_stats(pictures, ex.sets + ex.controls),
        "controls": stats.results(controls, ex.controls, METRICS) if ex.controls else {},
        "answers": stats.results(per_seed, ex.sets, ANSWER_STATS),
        "reward_weights": {
            a: arms.rewards_config(arms.ARMS[a], ex.levers)["init_args"]["weights"]
            for a in names
            if arms.ARMS[a].trains == "grpo"
        },
        "arms": {
            a: {
                "train_seconds": stats.summary([records[a][k]["seconds"] for k in range(args.seeds)]),
                "eval_seconds": stats.summary(
                    [records[a][k]["evaluated"]["seconds"] for k in range(args.seeds)]
                ),
                "early_stopping": [records[a][k].get("early_stopping") for k in range(args.seeds)],
                "training": report.mean_of([report.training_diagnostics(log) for log in logs[a]]),
                "per_seed": [report.training_diagnostics(log) for log in logs[a]],
            }
            for a in names
        },
    }
    diagnostics["seconds"] = round(time.perf_counter() - start_time, 1)
    diagnostics["jobs"] = workers
    (out / "diagnostics.json").write_text(json.dumps(diagnostics, indent=2))
    (out / "results.md").write_text(report.markdown(results, diagnostics, ex.sets, METRICS))
    pictures = {a: pictures[a] for a in names if a in pictures}  # the table's order
    report.figure(logs, table, ex.sets, pictures, ex.picture_set).save(out / "evidence.png")
    summary = {
        "out": str(out),
        "seconds": diagnostics["seconds"],
        "skipped_arms": skipped,
        "f1": {a: {s: table[a][s]["f1"]["mean"] for s in ex.sets} for a in names},
        "comparisons": {
            k: {s: v.get(s, {}).get("difference") for s in ex.sets} if "skipped" not in v else v
            for k, v in comparisons.items()
        },
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
