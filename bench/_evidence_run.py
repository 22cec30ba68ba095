"""The experiment of ``bench/evidence.py``, one arm at a time: train it, save its policy, evaluate a policy.

Imported by its bare name (the script runs as ``python bench/evidence.py``). Every module, data module and
trainer is built by the library's own CLI (:class:`dip_r1.cli.DipR1CLI`) from a config file written beside the
policy (``fit.yaml``, ``validate.yaml``), so what the experiment ran is what ``dip-r1`` runs from those files.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import yaml

from dip_r1.cli import DipR1CLI
from dip_r1.data import DetectionDataModule
from dip_r1.evaluation import DetectionEvaluator, Prediction, to_original_pixels
from dip_r1.export import copy_processor_files
from dip_r1.models import is_peft
from dip_r1.rewards.functional import match_detections

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
"""Trainer settings of every run: this script's stdout is its JSON, progress goes to stderr as JSON lines."""


@contextlib.contextmanager
def quiet_stdout():
    """Rich tables and Lightning notices to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def write_config(path: Path, config: dict, header: str) -> Path:
    """Write a ``dip-r1`` config file, ``header`` as its leading comment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    path.write_text(comment + yaml.safe_dump(config, sort_keys=False))
    return path


def build(config: Path, *overrides: str) -> DipR1CLI:
    """Model, data module (connected to the model's processor) and trainer of a config file, as ``dip-r1``
    builds them for a subcommand."""
    with quiet_stdout(), warnings.catch_warnings():
        # the script's own command line is not the CLI's: Lightning would warn that both are given
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return DipR1CLI(
            L.LightningModule,
            DetectionDataModule,
            subclass_mode_model=True,
            run=False,
            save_config_callback=None,
            args=["--config", str(config), *overrides],
        )


class BestPolicy(L.Callback):
    """Early stopping on a validation metric that keeps the best weights: SFT as its users run it.

    After each validation the metric is compared with the best so far; the trainable weights of a new best are
    copied to the CPU. Training stops once ``patience`` validations in a row brought no new best *and* the
    training steps (validation excluded) have taken at least ``min_seconds``; :meth:`restore` then puts the
    best weights back, which are the arm's policy.
    """

    def __init__(self, monitor: str, patience: int, min_seconds: float = 0.0) -> None:
        self.monitor, self.patience, self.min_seconds = monitor, patience, min_seconds
        self.best, self.best_step, self.wait = -math.inf, 0, 0
        self.train_seconds, self.history = 0.0, []
        self.stopped_by = "max_steps"
        self._state: dict | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_seconds += time.perf_counter() - self._start

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        self.history.append({"step": trainer.global_step, self.monitor: round(value, 5)})
        if value > self.best:
            self.best, self.best_step, self.wait = value, trainer.global_step, 0
            trainable = (p for p in pl_module.policy.named_parameters() if p[1].requires_grad)
            self._state = {name: p.detach().to("cpu", copy=True) for name, p in trainable}
        else:
            self.wait += 1
        if self.wait >= self.patience and self.train_seconds >= self.min_seconds:
            self.stopped_by = "patience"
            trainer.should_stop = True

    def restore(self, policy) -> None:
        """Load the best weights into ``policy`` (nothing when no validation ran)."""
        if self._state is None:
            return
        params = dict(policy.named_parameters())
        for name, value in self._state.items():
            params[name].data.copy_(value)

    def record(self) -> dict:
        return {
            "monitor": self.monitor,
            "patience": self.patience,
            "min_seconds": round(self.min_seconds, 1),
            "train_seconds": round(self.train_seconds, 1),
            "best": None if self._state is None else round(self.best, 5),
            "best_step": self.best_step,
            "stopped_by": self.stopped_by,
            "history": self.history,
        }


def save_policy(policy, base: str | Path, out: Path) -> None:
    """The trained policy as a transformers folder ``policy.path`` loads: LoRA adapters merged into the base
    weights, the base's processor files beside them."""
    if is_peft(policy):
        policy = policy.merge_and_unload()
    policy.save_pretrained(out)
    copy_processor_files(base, out)


def link_base(base: Path, out: Path) -> None:
    """The untrained arm's folder: the base's files, linked (a folder like the others, no copy of the weights)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(base).resolve().iterdir()):
        if f.is_file() and f.name not in ("validate.yaml", "fit.yaml"):
            (out / f.name).symlink_to(f)


def train(config: Path, base: str | Path, out: Path, stopper: BestPolicy | None = None) -> dict:
    """Train from ``config`` (a ``dip-r1 fit`` file) and save the policy to ``out``; returns ``{"seconds"}``
    (wall time of building, training and saving) and the stopper's record when there is one."""
    start = time.perf_counter()
    cli = build(config)
    if stopper is not None:
        cli.trainer.callbacks.append(stopper)
    with quiet_stdout():
        cli.trainer.fit(cli.model, cli.datamodule)
    if stopper is not None:
        stopper.restore(cli.model.policy)
    save_policy(cli.model.policy, base, out)
    record = {"seconds": round(time.perf_counter() - start, 1)}
    if stopper is not None:
        record["early_stopping"] = stopper.record()
    return record


def image_counts(p: Prediction) -> tuple[int, int, int]:
    """``(true positives, counted predictions, ground truth)`` of one answer at IoU 0.5, counted as
    :class:`~dip_r1.metrics.DetectionMetrics` counts them (ignore regions excused)."""
    gt = to_original_pixels(p.target["boxes"], p.target)
    m = match_detections(p.boxes, gt, to_original_pixels(p.target.get("ignore"), p.target), iou_threshold=0.5)
    return len(m.pred_index), int(m.num_pred), len(gt)


class _Pictures(L.Callback):
    """Keeps the first ``keep`` (resized) images of one set as they were prompted, for the figure."""

    def __init__(self, name: str | None, keep: int) -> None:
        self.name, self.keep, self.images = name, keep, {}

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        for p, image in zip(outputs, batch.get("images") or []):
            if p.target.get("dataset") == self.name and len(self.images) < self.keep:
                self.images[str(p.target.get("image_id"))] = image


def evaluate(config: Path, sources: list[dict], picture_set: str | None = None, keep: int = 8) -> dict:
    """Greedy answers of the policy of a ``validate.yaml`` on ``sources`` (``--data.predict``), scored by the
    evaluator ``dip-r1 validate`` uses.

    Returns ``{"metrics": {set: {metric: value}}, "counts": {set: {image_id: [tp, pred, gt]}},
    "predictions": {set: [Prediction]}, "images": {image_id: image}, "seconds"}``; a set is a source's
    ``name``; ``images`` are the first ``keep`` of ``picture_set``, as the model saw them.
    """
    start = time.perf_counter()
    cli = build(config, "--data.predict", json.dumps(sources))
    pictures = _Pictures(picture_set, keep)
    cli.trainer.callbacks.append(pictures)
    with quiet_stdout():
        batches = cli.trainer.predict(cli.model, cli.datamodule)
    evaluator, counts, by_set = DetectionEvaluator(), {}, {}
    for p in (p for batch in batches for p in batch):
        evaluator.update([p])
        name = str(p.target.get("dataset"))
        counts.setdefault(name, {})[str(p.target.get("image_id"))] = list(image_counts(p))
        by_set.setdefault(name, []).append(p)
    metrics = evaluator.compute()
    for name, predictions in by_set.items():  # the crops each answer was shown (0 without the zoom look)
        metrics[name]["crops"] = sum(len(getattr(p, "crops", [])) for p in predictions) / len(predictions)
    return {
        "metrics": metrics,
        "counts": counts,
        "predictions": by_set,
        "images": pictures.images,
        "seconds": round(time.perf_counter() - start, 1),
    }


def stderr(record: dict) -> None:
    """One JSON line of progress."""
    print(json.dumps(record), file=sys.stderr, flush=True)


def remove(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
