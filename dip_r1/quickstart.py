"""Synthetic data that builds itself on first use, and a quick warm start for tests and experiments.

``SyntheticCrowd`` generates its images on first use (``recipes/quickstart.yaml`` names it). ``TinySFT``
writes a tiny randomly initialised checkpoint and teaches it the Think-Look-Answer format with a short SFT
run: a policy that writes the format but ignores its image. The quickstart starts instead from the committed
seeing base, rebuilt when missing by ``dip_r1.pretrain.TinyPretrain``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from dip_r1.data.sample import DetectionSample
from dip_r1.data.sources import CrowdHuman
from dip_r1.data.synthetic import generate


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; if another process got there first, keep theirs."""
    try:
        tmp.rename(final)
    except OSError:  # `final` exists and is not empty
        shutil.rmtree(tmp, ignore_errors=True)


class SyntheticCrowd:
    """The synthetic crowd set as a source, generated under ``root`` on first use (then only read)."""

    def __init__(
        self,
        root: str = "data/synthetic-crowd",
        n: int = 200,
        seed: int = 0,
        width: int = 320,
        height: int = 240,
        min_people: int = 6,
        max_people: int = 24,
        name: str = "synthetic",
        background: str = "plain",
    ) -> None:
        """
        Args:
            root: folder of the set (``annotation.odgt`` and ``Images/``); generated when missing.
            n: number of images to generate.
            seed: seed of the generator.
            width: image width in pixels.
            height: image height in pixels.
            min_people: fewest figures per image.
            max_people: most figures per image.
            name: dataset name in metrics.
            background: ``"plain"`` or ``"clutter"`` (distractor shapes; see ``dip_r1.data.synthetic``).
        """
        self.root = Path(root)
        self.name = name
        self._args = dict(
            n=n,
            seed=seed,
            width=width,
            height=height,
            min_people=min_people,
            max_people=max_people,
            background=background,
        )

    def _reader(self) -> CrowdHuman:
        annotation = self.root / "annotation.odgt"
        if not annotation.is_file():
            # Built aside under a name of this process, then renamed: a set interrupted half-way is never
            # mistaken for a whole one, and two runs starting together do not write into each other's files.
            tmp = self.root.with_name(f"{self.root.name}.partial-{os.getpid()}")
            generate(tmp, **self._args)
            self.root.parent.mkdir(parents=True, exist_ok=True)
            _publish(tmp, self.root)
        return CrowdHuman(annotation, self.root / "Images", name=self.name)

    def __iter__(self) -> Iterator[DetectionSample]:
        return iter(self._reader())


class TinySFT:
    """Build a tiny policy at a path: random weights, then a short SFT run on the synthetic crowd set."""

    def __init__(
        self,
        family: str = "qwen2_vl",
        size: str = "xs",
        steps: int = 150,
        batch_size: int = 8,
        lr: float = 3e-3,
        data: SyntheticCrowd | None = None,
        seed: int = 0,
        home: str | None = None,
        force: bool = False,
    ) -> None:
        """
        Args:
            family: ``qwen2_vl`` or ``qwen2_5_vl``.
            size: ``xs`` (under 2 M parameters) or ``s`` (about 5 M).
            steps: SFT optimiser steps (few on purpose: the format is learnt, not perfected).
            batch_size: images per SFT step.
            lr: AdamW learning rate of the SFT run.
            data: the synthetic set to learn from (default: ``SyntheticCrowd()``).
            seed: seed of the weights and of the SFT run.
            home: the one folder it builds in unasked as a ``warm_start`` (``dip_r1.models.prepare_model_path``).
            force: as a ``warm_start``, build at any missing ``policy.path``.
        """
        self.home, self.force = home, force
        self.family, self.size, self.steps, self.batch_size, self.lr, self.seed = (
            family,
            size,
            steps,
            batch_size,
            lr,
            seed,
        )
        self.data = data or SyntheticCrowd()

    def build(self, path: str | Path) -> Path:
        """Write the warm-started checkpoint to ``path`` (atomically: a half-built one is never left there)."""
        import lightning as L

        from dip_r1.data import DetectionDataModule
        from dip_r1.models import PolicySpec
        from dip_r1.sft import SFTModule
        from dip_r1.tiny import save_tiny

        path = Path(path)
        tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_tiny(tmp, self.family, self.size, self.seed)
        with torch.random.fork_rng():
            L.seed_everything(self.seed, verbose=False)
            module = SFTModule(PolicySpec(str(tmp)), optimizer=lambda p: torch.optim.AdamW(p, lr=self.lr))
            data = DetectionDataModule(
                train=[self.data], batch_size=self.batch_size, seed=self.seed, num_workers=1
            )
            data.connect(module.processor, **module.data_spec())
            trainer = L.Trainer(
                max_steps=self.steps,
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=False,
            )
            print(f"dip_r1: warm-starting a tiny {self.family} policy with {self.steps} SFT steps -> {path}")
            trainer.fit(module, data)
            module.policy.save_pretrained(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        _publish(tmp, path)
        return path
