"""The LightningCLI behind ``dip-r1 fit / validate / test / predict`` (:mod:`dip_r1.cli` dispatches to it).

Checkpoints are written atomically (:class:`~dip_r1.checkpointing.AtomicCheckpointIO`) and carry the random
generator states (:class:`~dip_r1.checkpointing.RNGStateCallback`) unless the config brings its own
CheckpointIO plugin or turns ``--trainer.enable_checkpointing`` off: ``--ckpt_path last`` resumes exactly.
"""

from __future__ import annotations

import os
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichModelSummary, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from dip_r1.checkpointing import AtomicCheckpointIO, RNGStateCallback
from dip_r1.data import DetectionDataModule
from dip_r1.settings import SettingError


class DipR1CLI(LightningCLI):
    """LightningCLI that hands the model's processor to the DataModule once both are built."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as exc:
            # A wrong model or dataset path, or a setting out of its range: one line naming it (jsonargparse
            # would wrap it in pages of config dump), raised while the classes are built, before any model
            # weights are loaded.
            error = _one_line_error(exc)
            if error is None:
                raise
            raise SystemExit(f"dip-r1: error: {error}") from None
        model, data = self.model, self.datamodule
        if data is not None and hasattr(model, "processor"):
            data.connect(model.processor, **model.data_spec())

    def instantiate_trainer(self, **kwargs):
        # Rich progress bar and model summary by default, unless the config turns them off or brings its own;
        # atomic checkpoints with the generator states, unless checkpointing is off or has its own IO.
        config = self._get(self.config_init, "trainer", default={})
        user = config.get("callbacks") or []
        defaults = []
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in user
        ):
            defaults.append(RichProgressBar(leave=True))
        if config.get("enable_model_summary") is not False and not any(
            isinstance(c, ModelSummary) for c in user
        ):
            defaults.append(RichModelSummary(max_depth=2))
        if config.get("enable_checkpointing") is not False:
            if not any(isinstance(c, RNGStateCallback) for c in user):
                defaults.append(RNGStateCallback())
            plugins = config.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if "plugins" not in kwargs and not any(isinstance(p, CheckpointIO) for p in plugins):
                kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": defaults}
        return super().instantiate_trainer(**kwargs)


def _one_line_error(exc: BaseException | None) -> FileNotFoundError | SettingError | None:
    """The FileNotFoundError or SettingError that ``exc`` is or was caused by, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (FileNotFoundError, SettingError)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _subnormals_flushed() -> bool:
    """Whether the CPU currently treats subnormal floats as zero."""
    return bool((torch.tensor([1e-40]) * 1.0 == 0).item())


def run(args: list[str] | None = None) -> DipR1CLI | None:
    """Run the CLI on ``args`` (default: the command line).

    Returns the CLI object when ``args`` are given (tests, notebooks), None when they come from the command
    line: the ``dip-r1`` console script hands the return value to ``sys.exit``, where an object would mean
    exit status 1 after a successful run.
    """
    # Quiet the noise a CPU install prints on every import; real problems still raise.
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    warnings.filterwarnings("ignore", message=".*torchvision.*falling back.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Subnormal floats appear in small and randomly initialised models; x86 CPUs compute on them up to 10x
    # slower (the quickstart's steps went from 1 s to 20 s). Flushing them to zero changes no result that
    # matters and does nothing on GPUs.
    flushed_before = _subnormals_flushed()
    torch.set_flush_denormal(True)
    try:
        cli = DipR1CLI(
            L.LightningModule,
            DetectionDataModule,
            subclass_mode_model=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    finally:  # a process-wide CPU flag: called from Python, leave it as it was
        torch.set_flush_denormal(flushed_before)
    return cli if args is not None else None
