"""A quick warm start: a tiny randomly initialised policy taught the Think-Look-Answer format by a short SFT run.

It writes the format but ignores its image (tests and experiments that need a policy fast); the quickstart
starts instead from the committed seeing base (:mod:`dip_r1.tiny.pretrain`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dip_r1.data.sources.synthetic import SyntheticCrowd
from dip_r1.files import built_aside


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
        from dip_r1.tiny.checkpoints import save_tiny

        path = Path(path)
        with built_aside(path) as tmp, torch.random.fork_rng():
            save_tiny(tmp, self.family, self.size, self.seed)
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
        return path
