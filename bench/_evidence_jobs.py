"""The experiment's units of work, one arm of one seed each, run in order on ``--jobs`` processes.

A unit starts as soon as what it needs is done: an SFT arm its seed's GRPO arms (it trains at least as long as
the slowest of them), an untrained arm of seed ``k > 0`` its seed-0 evaluation (the same weights give the same
greedy answers). Otherwise the units start in the sequential order (seed by seed, ``arms.order`` within one), so
``--jobs 1`` is the sequential run, in this process. The tiny models gain nothing from a second thread
(``--threads``), but two processes use two cores: ``--jobs 2`` halves the wall time on a 2-core machine, while
each arm's figures stay those of its seed (only the SFT arms' stopping time, a wall time, moves).

Imported by its bare name (the script runs as ``python bench/evidence.py``); worker processes are spawned, with
this folder on their path.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple

import _common
import _evidence_arms as arms
import _evidence_plan as plan
import _evidence_run as run
import torch

HERE = str(Path(__file__).resolve().parent)


class Unit(NamedTuple):
    """One arm of one seed."""

    seed: int
    arm: str


def units(names: list[str], seeds: int) -> list[Unit]:
    """Every unit, in the sequential order.

    >>> units(["sft", "dip_r1", "base"], 2)[:3]
    [Unit(seed=0, arm='base'), Unit(seed=0, arm='dip_r1'), Unit(seed=0, arm='sft')]
    """
    return [Unit(seed, name) for seed in range(seeds) for name in arms.order(names)]


def needs(unit: Unit, names: list[str]) -> set[Unit]:
    """The units ``unit`` waits for.

    >>> sorted(needs(Unit(1, "sft"), ["base", "dip_r1", "no_look_zoom", "sft"]))
    [Unit(seed=1, arm='dip_r1'), Unit(seed=1, arm='no_look_zoom')]
    >>> needs(Unit(2, "base"), ["base"]), needs(Unit(0, "base"), ["base"])
    ({Unit(seed=0, arm='base')}, set())
    """
    trains = arms.ARMS[unit.arm].trains
    if trains == "sft":
        return {Unit(unit.seed, n) for n in names if arms.ARMS[n].trains == "grpo"}
    if trains == "none" and unit.seed:
        return {Unit(0, unit.arm)}
    return set()


def default_jobs(recipe: dict) -> int:
    """Processes when ``--jobs`` is not given: on a recipe whose trainer says ``accelerator: cpu`` the cores, at
    most 2 (the tiny models use one core each; two arms side by side halve the wall time on 2 cores), else 1
    (one model per accelerator; Lightning's ``auto`` may pick a GPU).

    >>> cpu = {"trainer": {"accelerator": "cpu"}}
    >>> default_jobs({}), default_jobs({"trainer": {"accelerator": "gpu"}}), default_jobs(cpu) == min(2, os.cpu_count())
    (1, 1, True)
    """
    if recipe.get("trainer", {}).get("accelerator") != "cpu":
        return 1
    return min(2, os.cpu_count() or 1)


class _InProcess:
    """An executor that runs each call at once, in this process (``--jobs 1``)."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # handed to the caller through the future, as a process pool does
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _init(threads: int, start_method: str) -> None:
    """A worker's process-wide settings: the parent's (a spawned process would otherwise spawn its data loaders'
    workers too, which cannot pickle the processor's class)."""
    multiprocessing.set_start_method(start_method, force=True)
    torch.set_num_threads(threads)
    _common.flush_denormals()


@contextlib.contextmanager
def executor(jobs: int, threads: int) -> Iterator:
    """``jobs`` spawned worker processes (this folder on their path), or this process when ``jobs`` is 1."""
    if jobs <= 1:
        yield _InProcess()
        return
    added = HERE not in sys.path
    if added:  # spawned workers import this module by its bare name, from the parent's path
        sys.path.insert(0, HERE)
    try:
        settings = (threads, multiprocessing.get_start_method())
        pool = ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init, initargs=settings
        )
        with pool:
            yield pool
    finally:
        if added:
            sys.path.remove(HERE)


def run_arm(
    ex: plan.Experiment, name: str, seed: int, base: str, grpo_seconds: list[float], earlier: dict | None
) -> dict:
    """Train one arm of one seed (``<arm>/seed<k>/``: the policy, ``fit.yaml``, ``validate.yaml``) and
    evaluate it on the test sets; returns ``{"seconds", "evaluated", "early_stopping"?}``. ``grpo_seconds``: the
    training times of the seed's GRPO arms (an SFT arm trains at least as long); ``earlier``: the arm's seed-0
    evaluation, reused by an untrained arm (greedy answers of the same weights are the same). Runs in a worker
    process with ``--jobs``."""
    args, arm, out = ex.args, arms.ARMS[name], ex.out
    folder, logs = out / name / f"seed{seed}", out / "logs" / name / f"seed{seed}"
    run.remove(folder, logs)
    if arm.trains == "none":
        run.link_base(Path(base), folder)
        record: dict = {"seconds": 0.0}
    else:
        how = f"how {name} seed {seed} was trained (dip-r1 fit --config this file)"
        stopper = None
        if arm.trains == "sft":
            how += (
                f"\nplus bench/evidence.py's early stopping on val/{plan.VALIDATION}/f1: patience "
                f"{args.sft_patience} validations, at least the slowest GRPO arm's training time"
            )
            least = max([*grpo_seconds, args.sft_min_seconds])
            stopper = run.BestPolicy(f"val/{plan.VALIDATION}/f1", args.sft_patience, least)
        config = run.write_config(folder / "fit.yaml", ex.fit_config(arm, base, seed, logs), how)
        record = run.train(config, base, folder, stopper)
    validate = run.write_config(
        folder / "validate.yaml",
        ex.validate_config(arm, folder),
        f"dip-r1 validate --config {folder}/validate.yaml --data.val '[...]'\n"
        f"evaluates {name} seed {seed} as bench/evidence.py did",
    )
    if arm.trains == "none" and earlier is not None:
        record["evaluated"] = earlier
    else:
        picture = ex.picture_set if seed == 0 else None
        record["evaluated"] = run.evaluate(validate, ex.test_sources(arm), picture)
    return record


def run_units(
    todo: list[Unit],
    names: list[str],
    start: Callable[[Unit], tuple | None],
    finish: Callable[[Unit, Future], None],
    jobs: int,
    threads: int,
) -> None:
    """Run ``todo`` on ``jobs`` processes. ``start(unit)``, called in this process once the unit's needs are
    done, gives ``(fn, *args)`` to run in a worker, or None to skip it; ``finish(unit, future)`` takes each
    result, in this process, as it comes."""
    pending, running, done = list(todo), {}, set()
    with executor(jobs, threads) as pool:
        while pending or running:
            for unit in [u for u in pending if needs(u, names) <= done]:
                if len(running) >= max(jobs, 1):
                    break
                pending.remove(unit)
                job = start(unit)
                if job is None:
                    done.add(unit)
                    continue
                running[pool.submit(*job)] = unit
            if not running:
                if pending and not any(needs(u, names) <= done for u in pending):
                    raise RuntimeError(f"units wait for units never run: {pending}")
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                unit = running.pop(future)
                finish(unit, future)
                done.add(unit)
