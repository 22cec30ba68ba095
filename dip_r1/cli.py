"""``dip-r1``: the LightningCLI (fit, validate, test, predict) over a policy module and the detection data.

dip-r1 fit --config recipes/quickstart.yaml
dip-r1 fit --config recipes/quickstart.yaml --model.init_args.group_size 4 --trainer.max_steps 10
dip-r1 fit --config recipes/quickstart.yaml --print_config
"""

from __future__ import annotations

import os
import warnings

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichModelSummary, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from dip_r1.data import DetectionDataModule


class DipR1CLI(LightningCLI):
    """LightningCLI that hands the model's processor to the DataModule once both are built."""

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        model, data = self.model, self.datamodule
        if data is not None and hasattr(model, "processor"):
            data.connect(model.processor, **model.data_spec())

    def instantiate_trainer(self, **kwargs):
        # Rich progress bar and model summary by default, unless the config turns them off or brings its own.
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
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": defaults}
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> DipR1CLI:
    # Quiet the noise a CPU install prints on every import; real problems still raise.
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    warnings.filterwarnings("ignore", message=".*torchvision.*falling back.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DipR1CLI(
        L.LightningModule,
        DetectionDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
