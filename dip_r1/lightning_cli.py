"""The LightningCLI behind ``dip-r1 fit / validate / test / predict`` (:mod:`dip_r1.cli` dispatches to it).

Checkpoints are written atomically (:class:`~dip_r1.checkpointing.AtomicCheckpointIO`) and carry the random
generator states (:class:`~dip_r1.checkpointing.RNGStateCallback`) unless the config brings its own
CheckpointIO plugin or turns ``--trainer.enable_checkpointing`` off: ``--ckpt_path last`` resumes exactly.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichModelSummary, RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO

from dip_r1 import preflight
from dip_r1.checkpointing import AtomicCheckpointIO, RNGStateCallback
from dip_r1.data import DetectionDataModule
from dip_r1.data.stream import source_name, source_path


class SaveConfig(SaveConfigCallback):
    """Writes the run's ``config.yaml`` into its logger's folder; a run without a logger writes none (its log
    folder would be the working folder, where it would replace a ``config.yaml`` of the user's)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


class DipR1CLI(LightningCLI):
    """LightningCLI that checks every input before anything is built (:mod:`dip_r1.preflight`), lets command
    line flags win over a checkpoint's stored hyper-parameters, and hands the model's processor to the
    DataModule once both are built."""

    def parse_arguments(self, parser, args) -> None:
        self._argv = (
            [a for a in args if isinstance(a, str)] if isinstance(args, (list, tuple)) else sys.argv[1:]
        )
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # Lightning replaces the config's model arguments by the checkpoint's hyper-parameters, flags typed on
        # the command line included: check the file first, then merge, then give the flags back their values.
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt or str(ckpt) in SPECIAL_CKPT_PATHS:
            return
        preflight.check_checkpoint(ckpt)
        if Path(ckpt).is_dir():
            return
        before = self.config[sub].clone()
        super()._parse_ckpt_path()
        stored = self.config[sub].clone()
        flags = [key for key in _command_line_keys(self._argv, "model") if key in before]
        for key in flags:
            self.config[sub][key] = before[key]
        _report_sources(before, stored, flags, "model")

    def instantiate_classes(self) -> None:
        # The accelerator and the model folder are checked first (a model a warm start may build is checked
        # once built); the data's files as the DataModule is built. No weights load before fit / validate.
        config = self.config[self.subcommand] if self.subcommand else self.config
        preflight.check_accelerator(config.get("trainer.accelerator"))
        if config.get("model.init_args.warm_start") is None and config.get("model.init_args.policy.path"):
            preflight.check_model_folder(config.get("model.init_args.policy.path"))
        super().instantiate_classes()
        model, data = self.model, self.datamodule
        if data is not None and hasattr(model, "processor"):
            data.connect(model.processor, **model.data_spec())

    # Before each subcommand: its data is there and not empty, ``--ckpt_path last`` finds a checkpoint; after
    # it: some sample was usable (an evaluation of nothing is an error, not an empty table).
    def before_fit(self) -> None:
        self._check_stage("fit", "train")

    def before_validate(self) -> None:
        self._check_stage("validate", "val")

    def before_test(self) -> None:
        self._check_stage("test", "test")

    def before_predict(self) -> None:
        self._check_stage("predict", "predict")

    def after_validate(self) -> None:
        self._check_used("val")

    def after_test(self) -> None:
        self._check_used("test")

    def after_predict(self) -> None:
        self._check_used("predict")

    def _check_stage(self, subcommand: str, stage: str) -> None:
        data = self.datamodule
        if isinstance(data, DetectionDataModule):
            if stage not in data.streams:
                flag = "--data.predict_images" if stage == "predict" else f"--data.{stage}"
                raise preflight.InputError(
                    f"{stage} data", flag, "no sources given", f"name them under data.{stage} in the config"
                )
            for source in data.streams[stage].sources:
                if next(iter(source), None) is None:
                    raise preflight.InputError(
                        f"{stage} source {source_name(source)}",
                        source_path(source),
                        "it holds no usable sample",
                        "check its annotation file",
                    )
        config = self.config_init[subcommand]
        ckpt = config.get("ckpt_path")
        if ckpt in ("last", "last_or_new"):
            config["ckpt_path"] = _last_checkpoint(self.trainer, new_ok=ckpt == "last_or_new")

    def _check_used(self, stage: str) -> None:
        data = self.datamodule
        if isinstance(data, DetectionDataModule) and stage in data.streams and not data.usable(stage):
            sources = ", ".join(str(source_path(s)) for s in data.streams[stage].sources)
            raise preflight.InputError(
                f"{stage} data",
                sources,
                "no image could be loaded, nothing was evaluated",
                "check the image folders and the image paths of the annotations",
            )

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


SPECIAL_CKPT_PATHS = ("last", "last_or_new", "best", "hpc", "registry")
"""``--ckpt_path`` values that name no file (``last_or_new``: the last checkpoint, or a new run when none)."""


def _command_line_keys(argv: list[str], section: str) -> list[str]:
    """The dotted keys under ``section`` that ``argv`` sets (``--model.init_args.x 1``, ``--model.x=1``)."""
    keys = []
    for arg in argv:
        if not arg.startswith(f"--{section}."):
            continue
        key = arg[2:].split("=", 1)[0]
        parts = key.split(".")
        if parts[1] not in ("init_args", "class_path", "help"):
            parts.insert(1, "init_args")
        keys.append(".".join(parts))
    return keys


def _report_sources(before, stored, flags: list[str], section: str) -> None:
    """Print, one line each, the values of ``section`` that the checkpoint (``stored``) changed, and the flags
    that kept their command line value over the checkpoint's."""

    def leaves(config) -> dict:
        values = config.get(section)
        return dict(values.items()) if values is not None else {}

    old, new = leaves(before), leaves(stored)
    for key in sorted(set(old) | set(new)):
        full = f"{section}.{key}"
        if old.get(key) == new.get(key) or any(full == f or full.startswith(f + ".") for f in flags):
            continue
        print(
            f"dip-r1: {full} = {new.get(key)!r} from the checkpoint (config: {old.get(key)!r})",
            file=sys.stderr,
        )
    for flag in flags:
        if before.get(flag) != stored.get(flag):
            print(
                f"dip-r1: {flag} = {before.get(flag)!r} from the command line (checkpoint: {stored.get(flag)!r})",
                file=sys.stderr,
            )


def _last_checkpoint(trainer: L.Trainer, *, new_ok: bool) -> str | None:
    """The newest ``last`` checkpoint of the trainer's ModelCheckpoint callbacks; none is an error unless
    ``new_ok`` (``--ckpt_path last_or_new``: then a new run)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    found = [Path(p) for c in callbacks if c.dirpath for p in c._find_last_checkpoints(trainer)]
    found = [p for p in found if p.exists()]
    if found:
        return str(max(found, key=lambda p: p.stat().st_mtime))
    if new_ok:
        return None
    folders = ", ".join(str(c.dirpath) for c in callbacks if c.dirpath) or "no ModelCheckpoint folder"
    raise preflight.MissingInput(
        "checkpoint",
        "--ckpt_path last",
        f"no last checkpoint yet ({folders})",
        "start without --ckpt_path, or use --ckpt_path last_or_new to resume when there is one",
    )


def run(args: list[str] | None = None) -> DipR1CLI | None:
    """Run the CLI on ``args`` (default: the command line).

    Returns the CLI object when ``args`` are given (tests, notebooks), None when they come from the command
    line: the ``dip-r1`` console script hands the return value to ``sys.exit``, where an object would mean
    exit status 1 after a successful run. A bad input (:data:`dip_r1.preflight.ONE_LINE_ERRORS`) exits with status 2 and one
    line, ``dip-r1: error: <what> at <path>: <why> (<what to do>)``; ``--debug`` or ``DIP_R1_DEBUG=1`` shows
    its traceback instead.
    """
    debug, argv = preflight.debugging(list(sys.argv[1:] if args is None else args))
    # Quiet the noise a CPU install prints on every import; real problems still raise.
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    warnings.filterwarnings("ignore", message=".*torchvision.*falling back.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Subnormal floats appear in small and randomly initialised models; x86 CPUs compute on them up to 10x
    # slower (the quickstart's steps went from 1 s to 20 s). Flushing them to zero changes no result that
    # matters and does nothing on GPUs.
    flushed_before = subnormals_flushed()
    torch.set_flush_denormal(True)
    try:
        with preflight.reported("dip-r1", debug):
            cli = DipR1CLI(
                L.LightningModule,
                DetectionDataModule,
                subclass_mode_model=True,
                seed_everything_default=0,
                save_config_callback=SaveConfig,
                save_config_kwargs={"overwrite": True},
                args=argv,
            )
    finally:  # a process-wide CPU flag: called from Python, leave it as it was
        torch.set_flush_denormal(flushed_before)
    return cli if args is not None else None


def subnormals_flushed() -> bool:
    """Whether the CPU currently treats subnormal floats as zero."""
    return bool((torch.tensor([1e-40]) * 1.0 == 0).item())
