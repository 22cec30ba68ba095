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
from dip_r1.dynamic_sampling import Drawn, fill_groups, next_training_batch, split_rows, stack_rows
from dip_r1.models import CheckpointBuilder, PolicySpec, is_peft
from dip_r1.policy_module import PolicyModule
from dip_r1.rewards import RewardSuite, parse_completion
from dip_r1.rollout import RolloutRecord, sample_completions
from dip_r1.scoring import all_logprobs, completion_logprobs, micro_batches
from dip_r1.settings import SettingError, check_grpo_settings
from dip_r1.step_metrics import step_metrics
from dip_r1.zoom import resolve_regions, zoom_of


def _default_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class GRPOModule(PolicyModule):
    """Group Relative Policy Optimisation of a vision-language model with rule-based rewards.

    Args:
        policy: the model to train: local path, LoRA / QLoRA, dtype.
        warm_start: builds the checkpoint at ``policy.path`` when it is missing: any ``CheckpointBuilder``
            (the quickstart's ``dip_r1.pretrain.TinyPretrain``, ``dip_r1.quickstart.TinySFT``), only at its
            own ``home`` folder or with its ``force`` set (``dip_r1.models.prepare_model_path``).
        rewards: the rewards, their weights and credit; default: format, look and accuracy, weight 1 each.
        group_size: completions sampled per prompt (G), >= 1; 1 warns: every advantage is 0, only the KL term
            (beta) moves the policy.
        sampling: how rollouts are decoded (:class:`~dip_r1.config.SamplingConfig`: length, temperature, top-p);
            ``validate`` / ``test`` / ``predict`` decode alike, greedily unless ``eval_do_sample``.
        loss: the GRPO objective (:class:`~dip_r1.config.LossConfig`: beta, clipping, loss type, reward scaling,
            truncated completions).
        num_iterations: optimiser steps on one rollout, >= 1 (old log-probs are kept only when > 1).
        dynamic_sampling: DAPO's dynamic sampling: leave out groups whose completions all score alike (no
            gradient) and draw more prompts from the training stream, inside the step, until the batch has its
            B groups (:mod:`dip_r1.dynamic_sampling`); one process only. Logs ``train/resampled_batches`` and
            ``train/dropped_groups``.
        max_resample_batches: most extra batches one step draws with ``dynamic_sampling``, >= 0; when reached,
            the step trains on the groups it has.
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
        dynamic_sampling: bool = False,
        max_resample_batches: int = 3,
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
        self.phase = "idle"
        """The part of ``training_step`` running now (``"rollout"``, ``"scoring"``, ``"idle"``): profilers read it."""
        self.step_timings: dict[str, float] = {}
        """The last training step's ``step_s`` and ``rollout_s`` (also logged as ``train/*``)."""
        self.last_rollout: RolloutRecord | None = None
        """The last training step's completions, parsed, and rewards (read by ``dip_r1.callbacks``); with
        ``dynamic_sampling``, those of the step's own batch."""
        self._rollout_s = 0.0  # time spent sampling in the current step

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        policy = self.load_policy(disable_dropout=self.hparams.disable_dropout)
        if self.loss_config.beta > 0 and not is_peft(policy):
            # Full fine-tuning needs a frozen copy; with LoRA the reference is the base with adapters disabled.
            self.ref_model = copy.deepcopy(policy).requires_grad_(False).eval()

    # --------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        if self.hparams.dynamic_sampling and self.trainer.world_size > 1:
            raise SettingError(
                "dynamic_sampling runs on one process (DDP ranks would draw different batches)"
            )

    def training_step(self, batch: dict | None, batch_idx: int) -> None:
        if batch is None:  # every image of the batch failed to load: nothing to learn from
            warnings.warn(f"batch {batch_idx}: no image could be loaded, step skipped", stacklevel=2)
            return None
        hp, cfg = self.hparams, self.loss_config
        start = time.perf_counter()
        G = hp.group_size
        self.rewards.set_step(self.global_step)  # rewards whose settings follow the step (a rising IoU)

        # 1. rollout: G completions per prompt, no gradients; 2. rewards
        self._rollout_s = 0.0
        first = self._roll_out(batch)
        counts = {}
        if hp.dynamic_sampling:  # flat groups out, more prompts in (dip_r1.dynamic_sampling)
            filled = fill_groups(
                first,
                self._draw,
                lambda scores: self.rewards.flat_groups(scores, G),
                groups=first.num_groups,
                group_size=G,
                max_draws=hp.max_resample_batches,
            )
            parts, drawn = filled.parts, filled.drawn
            counts = {"resampled_batches": float(filled.resampled), "dropped_groups": float(filled.dropped)}
        else:
            parts, drawn = [first], [first]
        rollout_s = self._rollout_s
        self.phase = "scoring"
        self.policy.train()
        self.last_rollout = first.record(self.global_step, G)

        # 3. advantages ([N], or [N, T] when a reward is credited to one block's tokens) and token weights, over
        # all parts at once; then per part, as the rows of each part's rollout
        scores = {k: torch.cat([p.scores[k].to(self.device) for p in parts]) for k in first.scores}
        advantages = self.rewards.advantages(
            scores,
            G,
            cfg.scale_rewards,
            block_mask=lambda block: stack_rows([p.block_mask(self.tokenizer, block) for p in parts]),
        )
        masks = [p.loss_mask(cfg.mask_truncated) for p in parts]
        mask = stack_rows(masks)
        num_tokens = None
        if cfg.loss_type in ("dapo", "cispo"):  # the ranks' mean token count: the whole batch's token mean
            num_tokens = self.trainer.strategy.reduce(mask.sum().float(), reduce_op="mean")
        weights = grpo.token_weights(mask, cfg.loss_type, self.sampling.max_new_tokens, num_tokens=num_tokens)
        advantages, weights = split_rows(advantages, parts), split_rows(weights, parts)

        # 4. old log-probs only when a rollout is reused, reference log-probs only when beta > 0
        old_logp = ref_logp = None
        if hp.num_iterations > 1:
            old_logp = [self._logprobs(p.batch["inputs"], p.rollout) for p in parts]
        if cfg.beta > 0:
            ref_logp = [self._logprobs(p.batch["inputs"], p.rollout, reference=True) for p in parts]

        # 5. loss over micro-batches, one optimiser step per GRPO iteration
        optimizer = self.optimizers()
        sums = dict.fromkeys(("kl", "clip_ratio", "entropy", "tokens"), 0.0)
        for _ in range(hp.num_iterations):
            optimizer.zero_grad(set_to_none=True)
            loss_total = 0.0
            for i, part in enumerate(parts):
                r = part.rollout
                for mb in micro_batches(len(r.prompt_index), hp.micro_batch_size):
                    logp, entropy = completion_logprobs(
                        self.policy,
                        part.batch["inputs"],
                        r.prompt_index[mb],
                        r.completion_ids[mb],
                        r.mask[mb],
                        temperature=self.sampling.temperature,
                        image_features=r.image_features,  # the rollout's vision output: no second encoder run
                        share_prefix=hp.share_prompt_prefix,
                        with_entropy=True,
                        zoom=r.zoom_columns(mb),  # zoom: crop tokens attended, outside the loss
                    )  # [n_mb, T] each
                    mb_mask = masks[i][mb]
                    top = cfg.top_entropy_quantile
                    keep = grpo.high_entropy_mask(entropy, mb_mask, top) if top < 1 else None
                    old = old_logp[i][mb] if old_logp is not None else logp.detach()
                    ref = ref_logp[i][mb] if ref_logp is not None else None
                    loss, stats = grpo.grpo_loss(
                        logp, old, ref, advantages[i][mb], weights[i][mb], cfg, entropy_mask=keep
                    )
                    self.manual_backward(loss)
                    loss_total += loss.detach()
                    n = mb_mask.sum().item()
                    sums["kl"] += stats["kl"].item() * n
                    sums["clip_ratio"] += stats["clip_ratio"].item() * n
                    sums["entropy"] += (entropy * mb_mask).sum().item()
                    sums["tokens"] += n
            self.checked_step(optimizer, loss_total, hp.max_grad_norm, hp.on_nonfinite)
        self.phase = "idle"

        # 6. logs: rewards and lengths of every completion rolled out this step
        elapsed = time.perf_counter() - start
        self.step_timings = {"step_s": elapsed, "rollout_s": rollout_s}
        tokens = max(sums.pop("tokens"), 1)
        stats = {"loss": float(loss_total), **{k: v / tokens for k, v in sums.items()}, **counts}
        all_scores = {k: torch.cat([d.scores[k] for d in drawn]) for k in first.scores}
        self._log_step(all_scores, [d.rollout for d in drawn], G, stats, elapsed, rollout_s)
        return None

    def _roll_out(self, batch: dict) -> Drawn:
        """Sample G completions for each prompt of ``batch`` and score them."""
        started = time.perf_counter()
        self.policy.eval()
        self.phase = "rollout"
        hp = self.hparams
        rollout = sample_completions(
            self.policy,
            batch["inputs"],
            self.sampling,
            self.token_ids,
            group_size=hp.group_size,
            zoom=zoom_of(batch, self.processor, self.sampling, self.token_ids),  # None unless zooming
            merge_lora=hp.rollout_merge_lora,
            compile_decode=hp.rollout_compile,
        )
        self._rollout_s += time.perf_counter() - started
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        crops = rollout.crops or [[] for _ in texts]
        # parsed once, for the rewards and the callbacks; boxes read off a crop are in the image frame from here
        parsed = [resolve_regions(parse_completion(text), shown) for text, shown in zip(texts, crops)]
        scores = self.rewards(parsed, batch["targets"], hp.group_size)  # {"total": [B*G], "<name>": [B*G]}
        return Drawn(batch, rollout, texts, parsed, scores)

    def _draw(self) -> Drawn | None:
        """The next training batch, rolled out and scored (None: its images all failed)."""
        batch = next_training_batch(self.trainer)
        return None if batch is None else self._roll_out(batch)

    def _logprobs(self, inputs, rollout, reference: bool = False) -> torch.Tensor:
        """Every completion's log-probs without gradients: the policy's (old), or the reference's."""
        hp = self.hparams
        kw = {"micro_batch_size": hp.micro_batch_size, "temperature": self.sampling.temperature}
        kw["share_prefix"] = hp.share_prompt_prefix
        if not reference or self.ref_model is not None:
            return all_logprobs(self.ref_model if reference else self.policy, inputs, rollout, **kw)
        with self.policy.disable_adapter():  # LoRA: the base is the reference
            return all_logprobs(self.policy, inputs, rollout, **kw)

    def _log_step(self, scores, rollouts, group_size, stats, elapsed, rollout_s) -> None:
        log = step_metrics(scores, rollouts, group_size, {**stats, "rollout_s": rollout_s}, elapsed)
        log["train/skipped_steps"] = float(self.skipped_steps)
        datamodule = getattr(self.trainer, "datamodule", None)
        for reason, count in getattr(datamodule, "skipped", {}).items():  # bad samples, counted not fatal
            log[f"data/skipped_{reason}"] = float(count)
        batch_size = sum(len(r.lengths) for r in rollouts) // group_size
        # Means over all ranks (DDP / FSDP), so the logged reward is the whole batch's, not rank 0's share.
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=batch_size, sync_dist=True)
        self.log(
            "reward", log["train/reward"], prog_bar=True, logger=False, batch_size=batch_size, sync_dist=True
        )
