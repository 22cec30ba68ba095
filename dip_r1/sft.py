"""Supervised fine-tuning on Think-Look-Answer targets built from the ground truth.

The paper's SFT baseline, and the warm start that makes a randomly initialised policy write the format at
all (otherwise every reward is 0 and GRPO's advantages vanish).
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from dip_r1.boxes import box_area, box_iou
from dip_r1.config import SamplingConfig
from dip_r1.data.prompts import format_completion
from dip_r1.grpo import masked_mean
from dip_r1.models import CheckpointBuilder, PolicySpec
from dip_r1.policy_module import PolicyModule
from dip_r1.scoring import completion_logprobs
from dip_r1.zoom.crops import zoom_of
from dip_r1.zoom.teacher import teacher_batch, teacher_logprobs, zoom_targets


def target_completion(target: dict, *, max_look: int = 2, category: str | None = None) -> str:
    """The answer a perfect policy writes for ``target`` (boxes in the model's coordinates).

    The look boxes are the ``max_look`` most occluded objects (highest IoU with another object), the smallest
    first on ties.

    >>> t = {"boxes": torch.tensor([[0.0, 0, 10, 10], [5.0, 0, 15, 10], [50.0, 50, 52, 60]]), "labels": ["person"] * 3}
    >>> print(target_completion(t, max_look=1))
    <think>3 persons, 2 occluded.</think>
    <look>[[0, 0, 10, 10]]</look>
    <answer>[{"bbox_2d": [0, 0, 10, 10], "label": "person"}, {"bbox_2d": [5, 0, 15, 10], "label": "person"}, {"bbox_2d": [50, 50, 52, 60], "label": "person"}]</answer>
    """
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = list(target.get("labels") or ["object"] * len(boxes))
    name = category or (max(set(labels), key=labels.count) if labels else "object")
    n = len(boxes)
    iou = box_iou(boxes, boxes).fill_diagonal_(0).max(dim=1).values if n > 1 else torch.zeros(n)
    occluded = int((iou > 0).sum())
    order = sorted(range(n), key=lambda i: (-float(iou[i]), float(box_area(boxes[i : i + 1])[0])))
    look = [i for i in order[:max_look] if n > 1 and iou[i] > 0]
    return format_completion(f"{n} {name}s, {occluded} occluded.", boxes[look], boxes, labels)


class SFTModule(PolicyModule):
    """Cross-entropy on Think-Look-Answer targets, with the same policy loader, data and evaluation as GRPO.

    The targets follow ``sampling.look_mode``: ``"text"``, :func:`target_completion`; ``"zoom"``, the zoom
    look's teacher completions (:func:`dip_r1.zoom.targets.zoom_target`: looks over the densest groups, the
    crops inserted as the rollout inserts them, the people inside a crop answered in its frame with
    ``"region"``), trained by teacher forcing through the crops (:mod:`dip_r1.zoom.teacher`).

    Args:
        policy: the model to train: local path, LoRA / QLoRA, dtype.
        warm_start: builds the checkpoint at ``policy.path`` when it is missing, only at its own ``home`` folder
            or with its ``force`` set (``dip_r1.models.prepare_model_path``).
        max_look: look boxes in each text target (the most occluded objects); zoom targets take
            ``sampling.max_looks``.
        max_target_tokens: targets are cut to this many tokens.
        optimizer: the optimiser, built on the trainable parameters (AdamW, lr 1e-4 by default).
        lr_scheduler: an optional learning-rate scheduler, stepped every step.
        sampling: how ``validate`` / ``test`` / ``predict`` decode (greedy by default), and with ``look_mode``
            which targets it trains on.
        micro_batch_size: answers scored at once when evaluating.
        compare_base: also evaluate the base model and print both rows and the difference.
    """

    def __init__(
        self,
        policy: PolicySpec,
        warm_start: CheckpointBuilder | None = None,
        max_look: int = 2,
        max_target_tokens: int = 512,
        optimizer: OptimizerCallable = lambda p: torch.optim.AdamW(p, lr=1e-4),
        lr_scheduler: LRSchedulerCallable | None = None,
        sampling: SamplingConfig = SamplingConfig(do_sample=False),  # noqa: B008 (frozen: a shared default is safe)
        micro_batch_size: int = 8,
        compare_base: bool = False,
    ) -> None:
        super().__init__()
        # Plain attributes, not hparams: a warm start (TinySFT) builds this module inside the CLI's own instantiation, where
        # save_hyperparameters would record the outer module's arguments.
        self.max_look = max_look
        self.max_target_tokens = max_target_tokens
        self.setup_policy(policy, warm_start, optimizer, lr_scheduler)
        self.setup_evaluation(sampling, micro_batch_size, compare_base)

    def configure_model(self) -> None:
        if self.policy is None:
            self.load_policy()

    def target_ids(self, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [B, T], mask [B, T])``: each target text and its EOS, right-padded."""
        tok = self.processor.tokenizer
        eos = tok.eos_token_id
        rows = []
        for t in targets:
            ids = tok(target_completion(t, max_look=self.max_look), add_special_tokens=False)["input_ids"]
            # A cut target ends without EOS: teaching EOS mid-answer would teach the policy to stop early.
            rows.append(ids + [eos] if len(ids) < self.max_target_tokens else ids[: self.max_target_tokens])
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return ids.to(self.device), mask.to(self.device)

    def training_step(self, batch: dict | None, batch_idx: int):
        if batch is None:
            return None
        if self.eval_sampling.look_mode == "zoom":
            logp, mask = self.zoom_logprobs(batch)
        else:
            ids, mask = self.target_ids(batch["targets"])
            index = torch.arange(len(ids), device=self.device)
            logp = completion_logprobs(self.policy, batch["inputs"], index, ids, mask)  # [B, T]
        loss = -masked_mean(logp, mask)
        self.log("train/sft_loss", loss, prog_bar=True, batch_size=len(mask))
        return loss

    def zoom_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logp [B, K], mask [B, K])``: the zoom teacher completions of the batch, teacher-forced through
        their crops (``mask``: the written tokens)."""
        zoom = zoom_of(batch, self.processor, self.eval_sampling, self.token_ids)
        written = teacher_batch(
            zoom, batch["inputs"], zoom_targets(zoom), self.tokenizer.eos_token_id, self.max_target_tokens
        )
        return teacher_logprobs(self.policy, written), written.supervised
