"""GRPO training of a vision-language policy with the DIP-R1 rewards, as a LightningModule.

``training_step`` reads top to bottom: rollout -> rewards -> advantages -> old / reference log-probs -> loss
over micro-batches with gradient accumulation -> one optimiser step per GRPO iteration. The maths is in
:mod:`dip_r1.grpo`, the sampling in :mod:`dip_r1.rollout`, the scoring in :mod:`dip_r1.scoring`, the rewards
and their advantages in :mod:`dip_r1.rewards`; loading, checkpoints and evaluation come from
:class:`~dip_r1.policy_module.PolicyModule`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from dip_r1 import grpo
from dip_r1.config import LossConfig, SamplingConfig
from dip_r1.credit import block_token_mask
from dip_r1.models import CheckpointBuilder, PolicySpec, is_peft
from dip_r1.policy_module import PolicyModule
from dip_r1.rewards import RewardSuite, parse_completion
from dip_r1.rollout import RolloutRecord, sample_completions
from dip_r1.scoring import all_logprobs, completion_logprobs, micro_batches
from dip_r1.settings import check_grpo_settings


def _default_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class GRPOModule(PolicyModule):
    """Group Relative Policy Optimisation of a vision-language model with rule-based rewards.

    Args:
        policy: the model to train: local path, LoRA / QLoRA, dtype.
        warm_start: builds the checkpoint at ``policy.path`` when it is missing: any ``CheckpointBuilder``
            (the quickstart's ``dip_r1.pretrain.TinyPretrain``, ``dip_r1.quickstart.TinySFT``).
        rewards: the rewards, their weights and credit; default: format, look and accuracy, weight 1 each.
        group_size: completions sampled per prompt (G), >= 1; 1 warns: every advantage is 0, only the KL term
            (beta) moves the policy.
        sampling: how rollouts are decoded (:class:`~dip_r1.config.SamplingConfig`: length, temperature, top-p);
            ``validate`` / ``test`` / ``predict`` decode alike, greedily unless ``eval_do_sample``.
        loss: the GRPO objective (:class:`~dip_r1.config.LossConfig`: beta, clipping, loss type, reward scaling,
            truncated completions).
        num_iterations: optimiser steps on one rollout, >= 1 (old log-probs are kept only when > 1).
        micro_batch_size: completions per forward / backward pass, >= 1 (gradients are accumulated).
        share_prompt_prefix: score a micro-batch of whole groups (``micro_batch_size`` a multiple of
            ``group_size``, or within one group) by running each prompt once and sharing its KV cache across
            the group's completions; same log-probs and gradients, less compute and memory (with LoRA
            dropout the group's rows share one dropout draw on the prompt). Off, or under gradient
            checkpointing, every completion runs its prompt again.
        max_grad_norm: clip the gradient norm to this, >= 0; 0 disables clipping.
        disable_dropout: set every dropout of the policy (LoRA's included) to 0, as TRL's ``disable_dropout``.
            Rollouts never use dropout (the policy samples in eval mode); the scoring passes (loss, old and
            reference log-probs) run in train mode, so without this they draw dropout noise.
        rollout_merge_lora: run rollouts on the LoRA adapters merged into copies of the base weights where that
            is exact and cheaper (not for 4-bit / 8-bit bases); the weights after a rollout are bit-identical.
        rollout_compile: run the rollouts' decoding forwards through ``torch.compile`` (on GPUs; compiling on
            the CPU costs more than it gains for short runs).
        on_nonfinite: ``"skip"`` an optimiser step whose loss or gradient is not finite, or ``"raise"``.
        optimizer: the optimiser, built on the trainable parameters (AdamW, lr 1e-5 by default).
        lr_scheduler: an optional learning-rate scheduler, stepped once per optimiser step.
        eval_do_sample: validate / test / predict with sampled answers (``sampling``'s temperature and top-p)
            instead of greedy ones.
        compare_base: also evaluate the base model in the same run (LoRA: adapters disabled; full
            fine-tuning: the reference copy, or the base loaded once more) and print both rows and the difference.
    """

    def __init__(
        self,
        policy: PolicySpec,
        warm_start: CheckpointBuilder | None = None,
        rewards: RewardSuite | None = None,
        group_size: int = 8,
        sampling: SamplingConfig = SamplingConfig(),  # noqa: B008 (frozen: a shared default is safe)
        loss: LossConfig = LossConfig(),  # noqa: B008
        num_iterations: int = 1,
        micro_batch_size: int = 8,
        share_prompt_prefix: bool = True,
        max_grad_norm: float = 1.0,
        disable_dropout: bool = False,
        rollout_merge_lora: bool = True,
        rollout_compile: bool = False,
        on_nonfinite: Literal["skip", "raise"] = "skip",
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval_do_sample: bool = False,
        compare_base: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["rewards", "optimizer", "lr_scheduler", "warm_start"])
        # before any model or data is built: one line, not a traceback from inside a step
        check_grpo_settings(self.hparams)
        self.automatic_optimization = False
        self.sampling, self.loss_config = sampling, loss
        self.setup_policy(policy, warm_start, optimizer, lr_scheduler)
        self.setup_evaluation(
            dataclasses.replace(sampling, do_sample=eval_do_sample), micro_batch_size, compare_base
        )
        self.rewards = rewards if rewards is not None else RewardSuite()
        self.skipped_steps = 0
        self.phase = "idle"
        """The part of ``training_step`` running now (``"rollout"``, ``"scoring"``, ``"idle"``): profilers read it."""
        self.step_timings: dict[str, float] = {}
        """The last training step's ``step_s`` and ``rollout_s`` (also logged as ``train/*``)."""
        self.last_rollout: RolloutRecord | None = None
        """The last training step's completions, parsed, and rewards (read by ``dip_r1.callbacks``)."""

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        policy = self.load_policy()
        if self.hparams.disable_dropout:
            for module in policy.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if self.loss_config.beta > 0 and not is_peft(policy):
            # Full fine-tuning needs a frozen copy; with LoRA the reference is the base with adapters disabled.
            self.ref_model = copy.deepcopy(policy).requires_grad_(False).eval()

    # --------------------------------------------------------------- training
    def training_step(self, batch: dict | None, batch_idx: int) -> None:
        if batch is None:  # every image of the batch failed to load: nothing to learn from
            warnings.warn(f"batch {batch_idx}: no image could be loaded, step skipped", stacklevel=2)
            return None
        hp, cfg = self.hparams, self.loss_config
        start = time.perf_counter()
        inputs, targets, G = batch["inputs"], batch["targets"], hp.group_size

        # 1. rollout: G completions per prompt, no gradients
        self.policy.eval()
        self.phase = "rollout"
        rollout = sample_completions(
            self.policy,
            inputs,
            self.sampling,
            self.token_ids,
            group_size=G,
            merge_lora=hp.rollout_merge_lora,
            compile_decode=hp.rollout_compile,
        )
        rollout_s = time.perf_counter() - start
        self.phase = "scoring"
        self.policy.train()
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        parsed = [parse_completion(text) for text in texts]  # once, for the rewards and the callbacks

        # 2. rewards, 3. advantages: [B*G], or [B*G, T] when a reward is credited to one block's tokens
        scores = self.rewards(parsed, targets, G)  # {"total": [B*G], "<name>": [B*G]}
        advantages = self.rewards.advantages(
            {k: v.to(self.device) for k, v in scores.items()},
            G,
            cfg.scale_rewards,
            block_mask=lambda block: block_token_mask(
                self.tokenizer, rollout.completion_ids, rollout.mask, parsed, block
            ),
        )
        self.last_rollout = RolloutRecord(
            self.global_step,
            G,
            texts,
            parsed,
            {k: v.detach().cpu() for k, v in scores.items()},
            targets,
            batch.get("images"),
            rollout,
        )
        mask = (
            grpo.apply_truncation_mask(rollout.mask, rollout.truncated)
            if cfg.mask_truncated
            else rollout.mask
        )
        weights = grpo.token_weights(mask, cfg.loss_type, self.sampling.max_new_tokens)  # [B*G, T]

        # 4. old log-probs only when a rollout is reused, reference log-probs only when beta > 0
        old_logp = (
            all_logprobs(self.policy, inputs, rollout, **self._scoring()) if hp.num_iterations > 1 else None
        )
        ref_logp = self._reference_logprobs(inputs, rollout) if cfg.beta > 0 else None

        # 5. loss over micro-batches, one optimiser step per GRPO iteration
        optimizer = self.optimizers()
        kl_sum = clip_sum = tokens = 0.0
        for _ in range(hp.num_iterations):
            optimizer.zero_grad(set_to_none=True)
            loss_total = 0.0
            for mb in micro_batches(len(rollout.prompt_index), hp.micro_batch_size):
                logp = completion_logprobs(
                    self.policy,
                    inputs,
                    rollout.prompt_index[mb],
                    rollout.completion_ids[mb],
                    rollout.mask[mb],
                    temperature=self.sampling.temperature,
                    image_features=rollout.image_features,  # the rollout's vision output: no second encoder run
                    share_prefix=hp.share_prompt_prefix,
                )  # [n_mb, T]
                old = old_logp[mb] if old_logp is not None else logp.detach()
                ref = ref_logp[mb] if ref_logp is not None else None
                loss, stats = grpo.grpo_loss(logp, old, ref, advantages[mb], weights[mb], cfg)
                self.manual_backward(loss)
                loss_total += loss.detach()
                mb_tokens = mask[mb].sum().item()
                kl_sum += stats["kl"].item() * mb_tokens
                clip_sum += stats["clip_ratio"].item() * mb_tokens
                tokens += mb_tokens
            self._optimizer_step(optimizer, loss_total)
        self.phase = "idle"

        # 6. logs
        elapsed = time.perf_counter() - start
        self.step_timings = {"step_s": elapsed, "rollout_s": rollout_s}
        stats = {
            "loss": float(loss_total),
            "kl": kl_sum / max(tokens, 1),
            "clip_ratio": clip_sum / max(tokens, 1),
        }
        self._log_step(scores, rollout, G, stats, elapsed, rollout_s)
        return None

    def _scoring(self) -> dict:
        """The keyword arguments of :func:`all_logprobs` (old and reference log-probs)."""
        return {
            "micro_batch_size": self.hparams.micro_batch_size,
            "temperature": self.sampling.temperature,
            "share_prefix": self.hparams.share_prompt_prefix,
        }

    def _reference_logprobs(self, inputs, rollout) -> torch.Tensor:
        if self.ref_model is not None:
            return all_logprobs(self.ref_model, inputs, rollout, **self._scoring())
        with self.policy.disable_adapter():
            return all_logprobs(self.policy, inputs, rollout, **self._scoring())

    def _optimizer_step(self, optimizer, loss: torch.Tensor) -> None:
        hp = self.hparams
        if hp.max_grad_norm > 0:
            self.clip_gradients(optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
        grads_finite = all(
            torch.isfinite(p.grad).all() for p in self.policy.parameters() if p.grad is not None
        )
        if not (torch.isfinite(torch.as_tensor(loss)) and grads_finite):
            if hp.on_nonfinite == "raise":
                raise FloatingPointError(f"non-finite loss or gradient at step {self.global_step}")
            self.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            return
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _log_step(self, scores, rollout, group_size, stats, elapsed, rollout_s) -> None:
        log = {f"train/{k}": v for k, v in stats.items()}
        for name, values in scores.items():
            key = "train/reward" if name == "total" else f"train/reward_{name}"
            log[key] = values.float().mean().item()
            log[f"{key}/std"] = values.float().std(unbiased=False).item()
            # The fraction of groups whose G values of this reward are all equal: such a reward gives no signal.
            suffix = "" if name == "total" else f"_{name}"
            log[f"train/zero_std_ratio{suffix}"] = (
                grpo.zero_std_mask(values, group_size).float().mean().item()
            )
        lengths = rollout.lengths.float()
        log["train/completion_length"] = lengths.mean().item()
        log["train/truncated_ratio"] = rollout.truncated.float().mean().item()
        log["train/tokens_per_s"] = lengths.sum().item() / max(elapsed, 1e-9)
        log["train/step_s"] = elapsed
        log["train/rollout_s"] = rollout_s
        log["train/skipped_steps"] = float(self.skipped_steps)
        datamodule = getattr(self.trainer, "datamodule", None)
        for reason, count in getattr(datamodule, "skipped", {}).items():  # bad samples, counted not fatal
            log[f"data/skipped_{reason}"] = float(count)
        batch_size = len(rollout.prompt_index) // group_size
        # Means over all ranks (DDP / FSDP), so the logged reward is the whole batch's, not rank 0's share.
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=batch_size, sync_dist=True)
        self.log(
            "reward", log["train/reward"], prog_bar=True, logger=False, batch_size=batch_size, sync_dist=True
        )

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dip_r1"]["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("dip_r1", {}).get("skipped_steps", 0)
