"""DAPO's dynamic sampling (arXiv 2503.14476; verl's ``filter_groups``, EasyR1's ``online_filtering``): a group
whose G completions all score alike has advantages 0 and gives the loss nothing (but the KL term), so the step
leaves it out and draws more prompts from the training stream until it has its B groups.

``GRPOModule(dynamic_sampling=True)`` rolls out and scores its batch; when some groups are flat
(``RewardSuite.flat_groups``) it takes the next batch from the training loader *inside the step*
(:func:`next_training_batch`), rolls it out and scores it, and so on, at most ``max_resample_batches`` more
batches. It keeps the first B non-flat groups in drawing order; when the bound is hit first it trains on what it
has (the first batch as drawn if no group had any spread). The extra batches pass through the DataModule's
``on_before_batch_transfer`` like any batch, so the stream position saved in checkpoints counts them and an
exact resume continues after them.

Runs on one process: DDP ranks would draw different numbers of batches (the stream's resume guarantee
needs equal ones) and run different numbers of backward passes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dip_r1 import grpo
from dip_r1.credit import block_token_mask
from dip_r1.rewards.parsing import ParsedCompletion
from dip_r1.rollout import Rollout, RolloutRecord


@dataclass
class Drawn:
    """One batch of prompts, rolled out and scored (or a part of it: some of its groups)."""

    batch: dict[str, Any]
    """The collated batch: ``inputs`` (the processor's, all prompts), ``targets``, ``images``."""
    rollout: Rollout
    """The completions; ``prompt_index`` refers to the prompts of ``batch["inputs"]``."""
    texts: list[str]
    parsed: list[ParsedCompletion]
    scores: dict[str, Tensor]
    """``"total"`` and each reward, one value per completion."""

    def record(self, step: int, group_size: int) -> RolloutRecord:
        """What the callbacks read of this batch's rollout (:class:`~dip_r1.rollout.RolloutRecord`)."""
        return RolloutRecord(
            step,
            group_size,
            self.texts,
            self.parsed,
            {k: v.detach().cpu() for k, v in self.scores.items()},
            self.batch["targets"],
            self.batch.get("images"),
            self.rollout,
            self.batch.get("sources"),
        )

    def block_mask(self, tokenizer, block: str) -> Tensor:
        """``Tensor[N, T]`` bool: the tokens of each completion that spell ``block`` (credited rewards)."""
        return block_token_mask(tokenizer, self.rollout.completion_ids, self.rollout.mask, self.parsed, block)

    def loss_mask(self, mask_truncated: bool) -> Tensor:
        """``Tensor[N, T]`` bool: the sampled tokens in the loss (all of a truncated completion's left out when
        ``mask_truncated``)."""
        if mask_truncated:
            return grpo.apply_truncation_mask(self.rollout.mask, self.rollout.truncated)
        return self.rollout.mask

    @property
    def num_groups(self) -> int:
        """The prompts rolled out (each with its group of G completions)."""
        return int(torch.unique(self.rollout.prompt_index).numel())

    def groups(self, index: Tensor, group_size: int) -> Drawn:
        """The same batch restricted to the groups ``index`` (``Tensor[k]`` long), in that order."""
        rows = (index[:, None] * group_size + torch.arange(group_size)).flatten()  # [k * G], prompt-major
        rollout = rollout_rows(self.rollout, rows)
        keep = rows.tolist()
        return Drawn(
            self.batch,
            rollout,
            [self.texts[j] for j in keep],
            [self.parsed[j] for j in keep],
            {k: v[rows.to(v.device)] for k, v in self.scores.items()},
        )


def rollout_rows(rollout: Rollout, rows: Tensor) -> Rollout:
    """The rollout restricted to the completions ``rows``: every per-completion field is indexed (the zoom ones
    too); the per-prompt vision output and the image bank stay whole (``prompt_index`` still refers to them)."""
    keep = rows.tolist()
    per_row = {}
    for f in dataclasses.fields(rollout):
        value = getattr(rollout, f.name)
        if f.name in ("image_features", "vision"):  # per prompt, or the bank: whole
            continue
        if f.name == "positions" and value is not None:  # [3, N, T]
            per_row[f.name] = value[:, rows.to(value.device)]
        elif f.name in ("crops", "row_images") and value is not None:
            per_row[f.name] = [value[j] for j in keep]
        elif isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == len(rollout.prompt_index):
            per_row[f.name] = value[rows.to(value.device)]
    return dataclasses.replace(rollout, **per_row)


@dataclass
class Filled:
    """What :func:`fill_groups` collected for one step."""

    parts: list[Drawn]
    """The groups the step trains on, one part per drawn batch that contributed any."""
    drawn: list[Drawn]
    """Every batch rolled out this step, whole, the step's own first."""
    resampled: int
    """Batches drawn beyond the step's own (skipped ones included)."""
    dropped: int
    """Groups rolled out but left out of the loss: flat, or beyond the B needed."""


def fill_groups(
    first: Drawn,
    draw: Callable[[], Drawn | None],
    flat_groups: Callable[[dict[str, Tensor]], Tensor],
    *,
    groups: int,
    group_size: int,
    max_draws: int,
) -> Filled:
    """Keep the non-flat groups of ``first``, then of batches from ``draw()`` (None: a batch with nothing to
    roll out; raises StopIteration when the stream has ended), until ``groups`` are kept or ``max_draws``
    batches were drawn. ``flat_groups(scores)`` is ``Tensor[B]`` bool (``RewardSuite.flat_groups``)."""
    parts: list[Drawn] = []
    drawn = [first]
    kept = resampled = 0

    def keep(d: Drawn) -> None:
        nonlocal kept
        live = (~flat_groups(d.scores).cpu()).nonzero().flatten()[: groups - kept]
        if len(live):
            parts.append(d.groups(live, group_size))
            kept += len(live)

    keep(first)
    while kept < groups and resampled < max_draws:
        try:
            d = draw()
        except StopIteration:
            break
        resampled += 1
        if d is not None:
            drawn.append(d)
            keep(d)
    if not parts:  # no group had any spread: the first batch as drawn (only its KL term moves the policy)
        parts = [first]
        kept = first.num_groups
    total = sum(len(d.texts) for d in drawn) // group_size
    return Filled(parts, drawn, resampled, total - kept)


def stack_rows(tensors: list[Tensor]) -> Tensor:
    """Tensors of ``n_i`` rows stacked into one; ``[n_i, T_i]`` ones padded on the right with zeros to the
    longest ``T`` (the parts' completions have their own lengths). One tensor is returned as is.

    >>> stack_rows([torch.ones(1, 2), torch.ones(2, 1)]).tolist()
    [[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]]
    """
    if len(tensors) == 1:
        return tensors[0]
    if tensors[0].dim() == 1:
        return torch.cat(tensors)
    t = max(x.shape[1] for x in tensors)
    return torch.cat([torch.nn.functional.pad(x, (0, t - x.shape[1])) for x in tensors])


def split_rows(stacked: Tensor, parts: list[Drawn]) -> list[Tensor]:
    """The inverse of :func:`stack_rows` for the parts' completions: each part's rows, cut to its length."""
    out, start = [], 0
    for part in parts:
        n, t = part.rollout.completion_ids.shape
        rows = stacked[start : start + n]
        out.append(rows[:, :t] if rows.dim() == 2 else rows)
        start += n
    return out


def next_training_batch(trainer) -> dict[str, Any] | None:
    """The next batch of the running fit loop's training loader, through the same hooks the loop applies (the
    DataModule's ``on_before_batch_transfer``, which advances the stream position, then the device transfer).
    None for a batch whose images all failed; StopIteration when the loader is exhausted."""
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is None:
        raise RuntimeError("dynamic_sampling draws from the training loader of a running Trainer.fit")
    batch, _, _ = next(fetcher)
    batch = trainer.precision_plugin.convert_input(batch)
    batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
    if batch is None:
        return None
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)
