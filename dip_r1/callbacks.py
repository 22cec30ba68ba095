"""Callbacks that show what the policy does: group pictures, a completions table, prediction files.

``GRPOModule`` leaves a :class:`RolloutRecord` in ``last_rollout`` after each training step (what the step
already computed: no extra forward); :class:`GroupPictures` and :class:`CompletionsTable` read it.
:class:`PredictionWriter` turns ``predict_step``'s :class:`~dip_r1.evaluation.Prediction` lists into PNGs and
``predictions.jsonl``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from dip_r1 import viz
from dip_r1.evaluation import Prediction, has_ground_truth
from dip_r1.report import prediction_record
from dip_r1.rollout import RolloutRecord


def _due(batch_idx: int, every_n_steps: int) -> bool:
    return every_n_steps > 0 and batch_idx % every_n_steps == 0


def _record(pl_module: L.LightningModule) -> RolloutRecord | None:
    return getattr(pl_module, "last_rollout", None)


class GroupPictures(Callback):
    """Every N training steps, a picture of one prompt's group: the G answers overlaid, the group-variance
    heatmap that drives the look reward, each completion's look boxes (:func:`dip_r1.viz.draw_group`); in zoom
    mode, each crop a completion was shown as an inset with the boxes read off it.

    Logged with ``add_image`` to every TensorBoard logger, and written as PNG files to
    ``<log_dir>/group_pictures/`` of every CSV logger (or to ``out_dir``).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        prompt: int = 0,
        grid: int = 32,
        min_size: int = 256,
        out_dir: str | None = None,
    ) -> None:
        """
        Args:
            every_n_steps: Draw at training batches 0, N, 2N, ...; 0 never draws.
            prompt: Which prompt of the batch to draw.
            grid: Cells per side of the heatmap (the look reward's grid).
            min_size: Small images are enlarged so that their shorter side is at least this.
            out_dir: Write the PNG files here instead of next to the CSV logger's metrics.
        """
        self.every_n_steps = every_n_steps
        self.prompt = prompt
        self.grid = grid
        self.min_size = min_size
        self.out_dir = out_dir
        self.written: list[Path] = []
        """The PNG files written so far."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = _record(pl_module)
        if not _due(batch_idx, self.every_n_steps) or record is None or not record.images:
            return
        if not trainer.is_global_zero:
            return
        b = min(self.prompt, len(record.targets) - 1)
        G = record.group_size
        group = record.parsed[b * G : (b + 1) * G]
        picture = viz.draw_group(
            record.images[b],
            [c.answer for c in group],
            [c.look for c in group],
            record.targets[b]["image_size"],
            grid=self.grid,
            min_size=self.min_size,
            crops=record.crops[b * G : (b + 1) * G],
            source=record.sources[b] if record.sources else None,
            regions=[c.regions for c in group],
        )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("group", viz.to_array(picture), record.step, dataformats="HWC")
        folders = [Path(self.out_dir)] if self.out_dir else []
        folders += [
            Path(lg.log_dir) / "group_pictures" for lg in trainer.loggers if isinstance(lg, CSVLogger)
        ]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"step_{record.step:06d}.png"
            picture.save(path)
            self.written.append(path)


class CompletionsTable(Callback):
    """Every N training steps, a rich table of a few completions of the step (one prompt's group first)
    with each reward component. Completions are escaped (a policy may write ``[bold]``) and truncated."""

    def __init__(self, every_n_steps: int = 50, n: int = 4, max_chars: int = 160) -> None:
        """
        Args:
            every_n_steps: Print at training batches 0, N, 2N, ...; 0 never prints.
            n: Completions shown.
            max_chars: Completions longer than this are cut, with "…".
        """
        self.every_n_steps = every_n_steps
        self.n = n
        self.max_chars = max_chars

    def table(self, record: RolloutRecord):
        """The ``rich.table.Table`` of a record's first ``n`` completions."""
        from rich.markup import escape
        from rich.table import Table

        shown = record.texts[: self.n]
        G = record.group_size
        images = sorted({str(record.targets[j // G].get("image_id", "")) for j in range(len(shown))})
        title = f"completions at step {record.step} (image {escape(', '.join(images))})"
        table = Table(title=title, show_lines=True)
        table.add_column("#", justify="right")  # prompt.completion
        table.add_column("completion", overflow="fold", min_width=24, ratio=1)
        names = list(record.scores)
        for name in names:
            table.add_column(name, justify="right")
        for j, text in enumerate(shown):
            text = text if len(text) <= self.max_chars else text[: self.max_chars] + "…"
            values = [f"{float(record.scores[name][j]):.3f}" for name in names]
            table.add_row(f"{j // G}.{j % G}", escape(text), *values)
        return table

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = _record(pl_module)
        if not _due(batch_idx, self.every_n_steps) or record is None or not trainer.is_global_zero:
            return
        from rich.console import Console

        Console().print(self.table(record))


def _fresh_folder(path: Path, name: str) -> Path:
    """``path``, or when it already holds ``name`` from an earlier run, its first free ``version_<n>``
    subfolder: a run never truncates what another wrote."""
    if not (path / name).exists():
        return path
    n = 1
    while (path / f"version_{n}" / name).exists():
        n += 1
    return path / f"version_{n}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"


class PredictionWriter(BasePredictionWriter):
    """Writes ``dip-r1 predict``'s results: per image a PNG (:func:`dip_r1.viz.draw_detections`: boxes and
    scores, dashed look regions, and with ground truth the true, false and missed boxes) and one line of
    ``predictions.jsonl`` (:func:`dip_r1.report.prediction_record`).

    Pictures are drawn on the image the model saw (resized); the JSONL boxes are in original pixels.
    """

    def __init__(self, output_dir: str | None = None, min_size: int = 256) -> None:
        """
        Args:
            output_dir: Where to write; default ``<logger log_dir>/predictions``, or ``runs/predict`` without
                a logger. A folder that already holds predictions is kept: this run writes to its first free
                ``version_<n>`` subfolder instead.
            min_size: Small images are enlarged so that their shorter side is at least this.
        """
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.min_size = min_size
        self.path: Path | None = None
        """The folder written to (set when prediction starts)."""

    def on_predict_start(self, trainer, pl_module) -> None:
        if self.output_dir is not None:
            path = Path(self.output_dir)
        elif trainer.logger is not None and trainer.logger.log_dir is not None:
            path = Path(trainer.logger.log_dir) / "predictions"
        else:
            path = Path("runs/predict")
        name = (
            "predictions.jsonl" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.jsonl"
        )
        path = _fresh_folder(path, name)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.jsonl = path / name
        self.jsonl.touch()
        self._names: set[str] = set()

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"dip-r1: predictions written to {self.path}")

    def write_on_batch_end(
        self,
        trainer,
        pl_module,
        prediction: list[Prediction],
        batch_indices,
        batch: Any,
        batch_idx,
        dataloader_idx,
    ) -> None:
        if not prediction:
            return
        images = (batch or {}).get("images") or [None] * len(prediction)
        with open(self.jsonl, "a") as f:
            for p, image in zip(prediction, images):
                name = None
                if image is not None:
                    name = self._picture_name(p.target)
                    self.render(p, image).save(self.path / name)
                f.write(json.dumps(prediction_record(p, name)) + "\n")

    def _picture_name(self, target: dict) -> str:
        """``<dataset>_<image id>.png`` (the id is the image's relative path for image folders), numbered when
        two images would share it: a picture never replaces another of the same run."""
        stem = f"{_safe(str(target.get('dataset')))}_{_safe(str(target.get('image_id')))}"
        name, n = f"{stem}.png", 1
        while name in self._names:
            n += 1
            name = f"{stem}_{n}.png"
        self._names.add(name)
        return name

    def render(self, p: Prediction, image: Image.Image) -> Image.Image:
        """The picture of one prediction on its (resized) image, with an inset per crop it was shown (zoom)."""
        target, known = p.target, has_ground_truth(p.target)
        return viz.draw_detections(
            image,
            p.parsed.answer,
            p.scores,
            look=p.parsed.look,
            gt=target["boxes"] if known else None,
            ignore=target.get("ignore") if known else None,
            coord_size=target["image_size"],
            min_size=self.min_size,
            crops=p.crops,
            source=p.source,
            regions=p.parsed.regions,
        )
