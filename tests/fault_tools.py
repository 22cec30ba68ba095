"""Pieces the reliability tests name in the YAML of their `dip-r1 fit` subprocesses (tests/ is put on
PYTHONPATH): a toy reward that records what each rank scored, and a callback that kills its own process."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import torch

from dip_r1.rewards import GroupReward


class LengthReward(GroupReward):
    """Toy reward with spread in every group of a random policy: the completion's length / 40, at most 1.

    With ``record`` set, each call appends ``{"rank", "image_ids", "scores"}`` to ``<record>/rank<r>.jsonl``.
    With ``flat_even``, the groups of images whose id ends in an even number all score 0.5 (zero std: rigged for
    dynamic sampling).
    """

    def __init__(self, record: str | None = None, flat_even: bool = False, **kwargs) -> None:
        """
        Args:
            record: folder where every scored batch is written down per rank (None: nothing written).
            flat_even: score the groups of even-numbered images 0.5 each.
        """
        super().__init__(**kwargs)
        self.record = record
        self.flat_even = flat_even

    def score(self, completions, targets, group_size):
        scores = torch.tensor([min(len(p.text) / 40, 1.0) for p in completions])
        if self.flat_even:
            for b, target in enumerate(targets):
                if int(target["image_id"].rsplit("_", 1)[-1]) % 2 == 0:
                    scores[b * group_size : (b + 1) * group_size] = 0.5
        if self.record:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            row = {"rank": rank, "image_ids": [t["image_id"] for t in targets], "scores": scores.tolist()}
            with open(Path(self.record) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return scores


class KillAt(L.Callback):
    """SIGKILL this process at the end of the training batch that reaches ``step`` optimiser steps, before
    that step's checkpoint is written (ModelCheckpoint runs after the other callbacks): a real ``kill -9``
    that loses the step's work, at a reproducible point."""

    def __init__(self, step: int) -> None:
        """
        Args:
            step: the global step at which the process dies.
        """
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


ROOT = Path(__file__).resolve().parents[1]


def fit_config(run: Path, model: str, data: Path, n_images: int = 12, **model_args) -> dict:
    """A shortened quickstart for ``dip-r1 fit``: a LoRA (with dropout) on a tiny model, the length reward,
    AdamW with a decaying learning rate, the synthetic crowd set, a checkpoint and ``last.ckpt`` every step,
    metrics in ``<run>/logs/version_*/metrics.csv``."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 4,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run), "name": "logs"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(run / "checkpoints"),
                        "save_last": True,
                        "every_n_train_steps": 1,
                    },
                }
            ],
        },
        "model": {
            "class_path": "dip_r1.module.GRPOModule",
            "init_args": {
                "policy": {"path": model, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
                "rewards": {"rewards": {"length": {"class_path": "fault_tools.LengthReward"}}},
                "group_size": 4,
                "sampling": {"max_new_tokens": 12},
                "micro_batch_size": 8,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
                "lr_scheduler": {
                    "class_path": "torch.optim.lr_scheduler.StepLR",
                    "init_args": {"step_size": 1, "gamma": 0.7},
                },
                **model_args,
            },
        },
        "data": {
            "train": [
                {
                    "class_path": "dip_r1.quickstart.SyntheticCrowd",
                    "init_args": {
                        "root": str(data),
                        "n": n_images,
                        "width": 96,
                        "height": 72,
                        "min_people": 1,
                        "max_people": 2,
                    },
                }
            ],
            "batch_size": 2,
            "shuffle_buffer": 8,
        },
    }


def write_config(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fit_env() -> dict:
    """The environment of a ``dip-r1 fit`` subprocess: this folder importable, one thread (2 shared cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def fit(config: Path, *args: str, timeout: float = 120):
    """Run ``dip-r1 fit --config CONFIG ARGS`` in a subprocess; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "dip_r1.cli", "fit", "--config", str(config), *args],
        env=fit_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=config.parent,
    )


def metrics(run: Path, version: int = 0) -> list[dict]:
    """The rows of a run's metrics.csv that carry a training reward."""
    import csv

    with open(run / "logs" / f"version_{version}" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/reward")]


def train(module, batches: list, max_steps: int, log_dir: Path) -> tuple[L.Trainer, list[dict]]:
    """``Trainer.fit`` on ``batches`` in order (None entries included), CSV logs; returns the trainer and the
    logged training rows."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=CSVLogger(log_dir),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    with open(next(Path(log_dir).rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/reward")]
    return trainer, rows
