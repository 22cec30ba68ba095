"""GRPO training of a vision-language policy with the DIP-R1 rewards, as a LightningModule.

``training_step`` reads top to bottom: rollout -> rewards -> advantages -> old / reference log-probs ->
loss over micro-batches with gradient accumulation -> one optimiser step per GRPO iteration. The maths is
in :mod:`dip_r1.grpo`, the sampling and scoring in :mod:`dip_r1.rollout`, the rewards in :mod:`dip_r1.rewards`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from dip_r1 import evaluation, grpo
from dip_r1.callbacks import RolloutRecord
from dip_r1.credit import credited_advantages
from dip_r1.models import (
    CheckpointBuilder,
    PolicySpec,
    checkpoint_state,
    is_peft,
    load_processor,
    prepare_model_path,
)
from dip_r1.rewards import RewardSuite, parse_completion
from dip_r1.rollout import all_logprobs, completion_logprobs, micro_batches, sample_completions
from dip_r1.settings import check_grpo_settings


def _default_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class GRPOModule(L.LightningModule):
    """Group Relative Policy Optimisation of a vision-language model with rule-based rewards.

    Args:
        policy: the model to train: local path, LoRA / QLoRA, dtype.
        warm_start: builds the checkpoint at ``policy.path`` when it is missing: any ``CheckpointBuilder``
            (the quickstart's ``dip_r1.pretrain.TinyPretrain``, ``dip_r1.quickstart.TinySFT``), only at its
            own ``home`` folder or with its ``force`` set (``dip_r1.models.prepare_model_path``).
        rewards: the rewards and their weights; default: format, look and accuracy, weight 1 each.
        group_size: completions sampled per prompt (G), >= 1; 1 warns: every advantage is 0, only the KL term
            (beta) moves the policy.
        max_new_tokens: most tokens of a completion, >= 1; longer ones are truncated.
        min_new_tokens: fewest tokens of a completion (EOS is suppressed until then), in [0, max_new_tokens];
            benchmarks set it to ``max_new_tokens`` so that every run generates the same number of tokens.
        temperature: sampling temperature of the rollouts (also divides the logits of the loss); > 0.
        top_p: nucleus sampling of the rollouts, in (0, 1].
        do_sample: sample the rollouts; False decodes them greedily (all G completions of a prompt alike, so
            their advantages are 0: for debugging), which is the way to greedy rollouts, not temperature 0.
        beta: weight of the KL penalty to the reference model, >= 0; 0 skips the reference forward entirely.
        num_iterations: optimiser steps on one rollout, >= 1 (old log-probs are kept only when > 1).
        epsilon_low: lower clip range of the ratio, >= 0.
        epsilon_high: upper clip range of the ratio, >= 0 (DAPO's clip-higher when above epsilon_low).
        loss_type: ``"grpo"`` (mean per sequence), ``"bnpo"`` (mean per token) or ``"dr_grpo"``.
        scale_rewards: advantages divided by the std of the ``"group"``, of the ``"batch"``, or ``"none"``.
        mask_truncated: leave completions that hit ``max_new_tokens`` out of the loss.
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
        eval_do_sample: validate / test / predict with sampled answers (``temperature``, ``top_p``) instead of
            greedy ones.
        compare_base: also evaluate the base model in the same run (LoRA: adapters disabled; full
            fine-tuning: the reference copy, or the base loaded once more) and print both rows and the difference.
    """

    def __init__(
        self,
        policy: PolicySpec,
        warm_start: CheckpointBuilder | None = None,
        rewards: RewardSuite | None = None,
        group_size: int = 8,
        max_new_tokens: int = 256,
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        do_sample: bool = True,
        beta: float = 0.0,
        num_iterations: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        mask_truncated: bool = False,
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
        self.policy_spec = policy
        self.automatic_optimization = False
        # LoRA checkpoints hold only the trainable weights: the frozen base comes from `model`.
        self.strict_loading = False
        self.model_path = prepare_model_path(policy.path, warm_start)
        self.processor = load_processor(self.model_path)
        self.rewards = rewards if rewards is not None else RewardSuite()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.policy: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self.skipped_steps = 0
        self.last_rollout: RolloutRecord | None = None
        """The last training step's completions, parsed, and rewards (read by ``dip_r1.callbacks``)."""
        self._evaluators: dict[str, evaluation.DetectionEvaluator] = {}
        self._base_copy: list[torch.nn.Module] = []  # a list: not registered, never in a checkpoint

    # ------------------------------------------------------------------ setup
    def data_spec(self) -> dict:
        """What the DataModule needs of this model: ``datamodule.connect(module.processor, **module.data_spec())``."""
        return self.policy_spec.data_spec(self.processor)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy, _ = self.policy_spec.load()
        if hp.disable_dropout:
            for module in self.policy.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        self.policy.train()
        if hp.beta > 0 and not is_peft(self.policy):
            # Full fine-tuning needs a frozen copy; with LoRA the reference is the base with adapters disabled.
            self.ref_model = copy.deepcopy(self.policy).requires_grad_(False).eval()

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
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
    def eos_ids(self) -> list[int]:
        """Every id that ends a completion: the checkpoint's generation config lists several (published Qwen
        folders: ``<|im_end|>`` and ``<|endoftext|>``), the tokenizer's EOS among them or not."""
        eos = self.policy.generation_config.eos_token_id if self.policy is not None else None
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        return list(dict.fromkeys(i for i in [*eos, self.tokenizer.eos_token_id] if i is not None))

    @property
    def placeholder_ids(self) -> list[int]:
        """Image / video placeholder tokens, which a completion must never contain."""
        names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        config = self.policy.config if self.policy is not None else None
        ids = {getattr(config, n, None) for n in names} | {getattr(self.processor, n, None) for n in names}
        return sorted(i for i in ids if isinstance(i, int))

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_ids[0]

    @property
    def never_sampled_ids(self) -> list[int]:
        """Tokens a rollout never samples: the image placeholders, and the pad token unless it is an EOS (a
        sampled pad would be masked out as padding, leaving a hole in the completion and its length short)."""
        pad = [] if self.pad_id in self.eos_ids else [self.pad_id]
        return sorted(set(self.placeholder_ids + pad))

    # --------------------------------------------------------------- training
    def training_step(self, batch: dict | None, batch_idx: int) -> None:
        if batch is None:  # every image of the batch failed to load: nothing to learn from
            warnings.warn(f"batch {batch_idx}: no image could be loaded, step skipped", stacklevel=2)
            return None
        hp = self.hparams
        start = time.perf_counter()
        inputs, targets, G = batch["inputs"], batch["targets"], hp.group_size

        # 1. rollout: G completions per prompt, no gradients
        self.policy.eval()
        rollout = sample_completions(
            self.policy,
            inputs,
            group_size=G,
            max_new_tokens=hp.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            temperature=hp.temperature,
            top_p=hp.top_p,
            do_sample=hp.do_sample,
            suppress_token_ids=self.never_sampled_ids,
            min_new_tokens=hp.min_new_tokens,
            merge_lora=hp.rollout_merge_lora,
            compile_decode=hp.rollout_compile,
        )
        self.policy.train()
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        parsed = [parse_completion(text) for text in texts]  # once, for the rewards and the callbacks

        # 2. rewards, 3. advantages
        scores = self.rewards(parsed, targets, G)  # {"total": [B*G], "<name>": [B*G]}
        self.last_rollout = RolloutRecord(
            self.global_step,
            G,
            texts,
            parsed,
            {k: v.detach().cpu() for k, v in scores.items()},
            targets,
            batch.get("images"),
        )
        total = scores["total"].to(self.device)
        advantages = grpo.group_advantages(total, G, scale=hp.scale_rewards)  # [B*G]
        # a reward credited to one block (``rewards.credit``) reaches only its tokens: [B*G, T] then
        advantages = credited_advantages(
            self.rewards,
            scores,
            advantages,
            self.tokenizer,
            rollout.completion_ids,
            rollout.mask,
            parsed,
            G,
            hp.scale_rewards,
        )

        mask = rollout.mask
        if hp.mask_truncated:
            mask = grpo.apply_truncation_mask(mask, rollout.truncated)
        weights = grpo.token_weights(mask, hp.loss_type, max_completion_length=hp.max_new_tokens)  # [B*G, T]

        # 4. old log-probs only when a rollout is reused, reference log-probs only when beta > 0
        old_logp = (
            all_logprobs(self.policy, inputs, rollout, **self._scoring()) if hp.num_iterations > 1 else None
        )
        ref_logp = self._reference_logprobs(inputs, rollout) if hp.beta > 0 else None

        # 5. loss over micro-batches, one optimiser step per GRPO iteration
        optimizer = self.optimizers()
        n = len(rollout.prompt_index)
        kl_sum = clip_sum = tokens = 0.0
        for _ in range(hp.num_iterations):
            optimizer.zero_grad(set_to_none=True)
            loss_total = 0.0
            for mb in micro_batches(n, hp.micro_batch_size):
                logp = completion_logprobs(
                    self.policy,
                    inputs,
                    rollout.prompt_index[mb],
                    rollout.completion_ids[mb],
                    rollout.mask[mb],
                    temperature=hp.temperature,
                    image_features=rollout.image_features,  # the rollout's vision output: no second encoder run
                    share_prefix=hp.share_prompt_prefix,
                )  # [n_mb, T]
                loss, stats = grpo.grpo_loss(
                    logp,
                    old_logp[mb] if old_logp is not None else logp.detach(),
                    ref_logp[mb] if ref_logp is not None else None,
                    advantages[mb],
                    mask[mb],
                    beta=hp.beta,
                    epsilon_low=hp.epsilon_low,
                    epsilon_high=hp.epsilon_high,
                    weights=weights[mb],
                    loss_type=hp.loss_type,
                    max_completion_length=hp.max_new_tokens,
                )
                self.manual_backward(loss)
                loss_total += loss.detach()
                mb_tokens = mask[mb].sum().item()
                kl_sum += stats["kl"].item() * mb_tokens
                clip_sum += stats["clip_ratio"].item() * mb_tokens
                tokens += mb_tokens
            self._optimizer_step(optimizer, loss_total)

        # 6. logs
        elapsed = time.perf_counter() - start
        self._log_step(
            scores, rollout, G, loss_total, kl_sum / max(tokens, 1), clip_sum / max(tokens, 1), elapsed
        )
        return None

    def _scoring(self) -> dict:
        """The keyword arguments of :func:`all_logprobs` (old and reference log-probs)."""
        hp = self.hparams
        return {
            "micro_batch_size": hp.micro_batch_size,
            "temperature": hp.temperature,
            "share_prefix": hp.share_prompt_prefix,
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

    def _log_step(self, scores, rollout, group_size, loss, kl, clip_ratio, elapsed) -> None:
        log = {"train/loss": float(loss), "train/kl": kl, "train/clip_ratio": clip_ratio}
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
        return evaluation.attach_rewards(self._predict(self.policy, batch), self.rewards)

    def on_validation_epoch_start(self) -> None:
        self._evaluators = {name: evaluation.DetectionEvaluator() for name in self._evaluated_models()}

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def _evaluated_models(self) -> list[str]:
        return ["trained", "base"] if self.hparams.compare_base else ["trained"]

    def _predict(self, model: torch.nn.Module, batch: dict) -> list[evaluation.Prediction]:
        hp = self.hparams
        decoded = evaluation.decode_batch(
            model,
            self.tokenizer,
            batch["inputs"],
            max_new_tokens=hp.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            do_sample=hp.eval_do_sample,
            temperature=hp.temperature,
            top_p=hp.top_p,
            suppress_token_ids=self.never_sampled_ids,
            micro_batch_size=hp.micro_batch_size,
        )
        return evaluation.make_predictions(self.tokenizer, decoded, batch["targets"])

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
        log = evaluation.flatten(results["trained"], stage)
        if "base" in results:
            log.update(evaluation.flatten(results["base"], f"{stage}_base"))
        self.log_dict(log, on_step=False, on_epoch=True)
        if self.trainer.is_global_zero:
            title = f"{stage}: {'sampled' if self.hparams.eval_do_sample else 'greedy'} answers"
            evaluation.print_metrics(results["trained"], results.get("base"), title=title)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = checkpoint_state(checkpoint["state_dict"], self.policy)
        checkpoint["dip_r1"] = {
            "model": str(self.model_path.resolve()),  # an export from any folder finds it
            "policy": dataclasses.asdict(self.policy_spec),
            "skipped_steps": self.skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("dip_r1", {}).get("skipped_steps", 0)
