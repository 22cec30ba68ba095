"""What every module that trains a policy shares: loading it, its optimiser, its checkpoints, and evaluation.

:class:`PolicyModule` is the base of :class:`~dip_r1.module.GRPOModule` and :class:`~dip_r1.sft.SFTModule`, so
``dip-r1 validate / test / predict`` decode, score and report the same way whatever trained the policy.
Evaluation decodes one answer per image (:func:`dip_r1.evaluation.predict`), feeds a
:class:`~dip_r1.evaluation.DetectionEvaluator` per evaluated model (``"trained"``, and ``"base"`` with
``compare_base``) and prints the table at the end of the epoch (:mod:`dip_r1.report`).
"""

from __future__ import annotations

import dataclasses

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from dip_r1 import evaluation, report
from dip_r1.config import SamplingConfig
from dip_r1.models import (
    CheckpointBuilder,
    PolicySpec,
    checkpoint_state,
    load_processor,
    prepare_model_path,
)
from dip_r1.tokens import TokenIds


class PolicyModule(L.LightningModule):
    """A policy loaded from a :class:`~dip_r1.models.PolicySpec`, its optimiser, checkpoints and evaluation.

    Subclasses call :meth:`setup_policy` and :meth:`setup_evaluation` from their ``__init__`` (whose signature
    LightningCLI reads) and write ``training_step``.
    """

    def setup_policy(
        self,
        policy: PolicySpec,
        warm_start: CheckpointBuilder | None,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
    ) -> None:
        """Build the checkpoint if ``warm_start`` is given, it is missing and the builder may build there (its
        ``home``, or ``force``: :func:`~dip_r1.models.prepare_model_path`), check it, load its processor."""
        # LoRA checkpoints hold only the trainable weights: the frozen base comes from `policy.path`.
        self.strict_loading = False
        self.policy_spec = policy
        self.model_path = prepare_model_path(policy.path, warm_start)
        self.processor = load_processor(self.model_path)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.policy: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None  # a frozen copy, where the subclass needs one
        self._token_ids: TokenIds | None = None
        self.skipped_steps = 0
        """Optimiser steps skipped for a non-finite loss or gradient (:meth:`checked_step`)."""

    def setup_evaluation(self, sampling: SamplingConfig, micro_batch_size: int, compare_base: bool) -> None:
        """How ``validate`` / ``test`` / ``predict`` decode (``sampling``), how many answers are scored at once,
        and whether the base model is evaluated beside the trained one."""
        self.eval_sampling = sampling
        self.eval_micro_batch_size = micro_batch_size
        self.compare_base = compare_base
        self._evaluators: dict[str, evaluation.DetectionEvaluator] = {}
        self._base_copy: list[torch.nn.Module] = []  # a list: not registered, never in a checkpoint

    # ------------------------------------------------------------------ setup
    def data_spec(self) -> dict:
        """What the DataModule needs of this model: ``datamodule.connect(module.processor, **module.data_spec())``
        (the coordinate convention; the source images too when the model zooms)."""
        keep_source = self.eval_sampling.look_mode == "zoom"
        return {**self.policy_spec.data_spec(self.processor), "keep_source": keep_source}

    def load_policy(self, disable_dropout: bool = False) -> torch.nn.Module:
        """Load the policy (``configure_model`` calls this once) in training mode; ``disable_dropout`` sets every
        dropout probability to 0 (LoRA's included)."""
        self.policy, _ = self.policy_spec.load()
        if disable_dropout:
            for module in self.policy.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        self.policy.train()
        return self.policy

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"},
        }

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def token_ids(self) -> TokenIds:
        """The policy's EOS, pad and never-sampled ids (:class:`~dip_r1.tokens.TokenIds`), once it is loaded."""
        if self._token_ids is None:
            if self.policy is None:
                return TokenIds.of(None, self.processor)
            self._token_ids = TokenIds.of(self.policy, self.processor)
        return self._token_ids

    def checked_step(self, optimizer, loss: torch.Tensor, max_grad_norm: float, on_nonfinite: str) -> None:
        """Clip the gradient norm (``max_grad_norm`` > 0), then step the optimiser and the scheduler, unless the
        loss or a gradient is not finite: then ``on_nonfinite`` ``"raise"`` raises and ``"skip"`` counts the step
        in :attr:`skipped_steps` and drops its gradients."""
        if max_grad_norm > 0:
            self.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if not (torch.isfinite(torch.as_tensor(loss)) and all(torch.isfinite(g).all() for g in grads)):
            if on_nonfinite == "raise":
                raise FloatingPointError(f"non-finite loss or gradient at step {self.global_step}")
            self.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            return
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    # ------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict | None, batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch: dict | None, batch_idx: int) -> None:
        self._evaluate(batch)

    def predict_step(self, batch: dict | None, batch_idx: int) -> list[evaluation.Prediction]:
        """Each image's answer, parsed, scored, in original pixels, with its rewards when ground truth is known
        (``dip_r1.callbacks.PredictionWriter`` writes them out)."""
        if batch is None:
            return []
        predictions = self._predict(self.policy, batch)
        rewards = getattr(self, "rewards", None)  # a RewardSuite, where the subclass has one
        return evaluation.attach_rewards(predictions, rewards) if rewards is not None else predictions

    def on_validation_epoch_start(self) -> None:
        names = ["trained", "base"] if self.compare_base else ["trained"]
        self._evaluators = {name: evaluation.DetectionEvaluator() for name in names}

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def _predict(self, model: torch.nn.Module, batch: dict) -> list[evaluation.Prediction]:
        return evaluation.predict(
            model,
            self.processor,
            batch,
            self.eval_sampling,
            self.token_ids,
            micro_batch_size=self.eval_micro_batch_size,
        )

    def _evaluate(self, batch: dict | None) -> None:
        if batch is None:
            return
        self._evaluators["trained"].update(self._predict(self.policy, batch))
        if "base" in self._evaluators:
            with evaluation.base_model(self.policy, self._full_base) as base:
                self._evaluators["base"].update(self._predict(base, batch))

    def _full_base(self) -> torch.nn.Module:
        """The base of a fully fine-tuned policy: the reference copy, else the checkpoint at ``policy.path``
        loaded once more (a second copy in memory, only while comparing)."""
        if self.ref_model is not None:
            return self.ref_model
        if not self._base_copy:
            model, _ = self.policy_spec.load()
            self._base_copy.append(model.requires_grad_(False).eval().to(self.device))
        return self._base_copy[0]

    def _report(self, stage: str) -> None:
        results = {name: ev.compute() for name, ev in self._evaluators.items()}
        if self.trainer.sanity_checking or not results:
            return
        log = report.flatten(results["trained"], stage)
        if "base" in results:
            log.update(report.flatten(results["base"], f"{stage}_base"))
        self.log_dict(log, on_step=False, on_epoch=True)
        if self.trainer.is_global_zero:
            title = f"{stage}: {'sampled' if self.eval_sampling.do_sample else 'greedy'} answers"
            report.print_metrics(results["trained"], results.get("base"), title=title)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = checkpoint_state(checkpoint["state_dict"], self.policy)
        checkpoint["dip_r1"] = {
            "model": str(self.model_path.resolve()),  # an export from any working folder finds it
            "policy": dataclasses.asdict(self.policy_spec),
            "skipped_steps": self.skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("dip_r1", {}).get("skipped_steps", 0)
