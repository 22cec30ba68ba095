"""Degenerate steps: groups without reward spread, empty and truncated completions, batches whose images all
failed, non-finite losses and gradients. Tiny Qwen2-VL, in process."""

from __future__ import annotations

import math

import pytest
import torch
from fault_tools import LengthReward, train
from helpers import prompt_batch, toy_targets

from dip_r1 import grpo
from dip_r1 import module as module_mod
from dip_r1.config import LossConfig, SamplingConfig
from dip_r1.data.module import DetectionDataModule, TrackedBatch
from dip_r1.models import PolicySpec
from dip_r1.module import GRPOModule
from dip_r1.rewards import RewardSuite

G = 4


class FlatFirstPrompt(LengthReward):
    """Every completion of prompt 0 scores 1 (a group with no spread); prompt 1's are scored by length."""

    def score(self, completions, targets, group_size):
        scores = super().score(completions, targets, group_size)
        scores[:group_size] = 1.0
        return scores


class Flat(LengthReward):
    def score(self, completions, targets, group_size):
        return torch.full((len(completions),), 0.5)


def _module(path, reward=None, **kw) -> GRPOModule:
    options = dict(
        rewards=RewardSuite({"r": reward or LengthReward()}),
        group_size=G,
        sampling=SamplingConfig(max_new_tokens=6),
        micro_batch_size=8,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    module = GRPOModule(PolicySpec(path), **{**options, **kw})
    module.configure_model()
    return module


def _batch(module) -> dict:
    return {"inputs": prompt_batch(module.processor), "targets": toy_targets(2)}


def _weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}


def test_equal_rewards_give_zero_advantages():
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.0, 1.0, 0.0, 1.0])
    advantages = grpo.group_advantages(rewards, G)
    # group 1: mean .5, std .5: (r - .5) / (.5 + 1e-4)
    expected = [0.0] * 4 + [-0.5 / 0.5001, 0.5 / 0.5001] * 2
    torch.testing.assert_close(advantages, torch.tensor(expected))
    assert grpo.zero_std_mask(rewards, G).tolist() == [True] * 4 + [False] * 4


def test_a_flat_group_trains_with_a_finite_loss_and_is_counted(tiny_qwen2_vl, tmp_path):
    module = _module(tiny_qwen2_vl, FlatFirstPrompt())
    batch = _batch(module)
    trainer, rows = train(module, [batch], 1, tmp_path)
    (row,) = rows
    assert float(row["train/zero_std_ratio"]) == 0.5  # one group of two
    assert math.isfinite(float(row["train/loss"])) and float(row["train/skipped_steps"]) == 0
    assert trainer.global_step == 1


def test_all_flat_groups_leave_the_weights_unchanged(tiny_qwen2_vl, tmp_path):
    module = _module(tiny_qwen2_vl, Flat())
    before = _weights(module)
    _, (row,) = train(module, [_batch(module)], 1, tmp_path)
    assert float(row["train/zero_std_ratio"]) == 1.0 and float(row["train/loss"]) == 0.0
    for name, value in _weights(module).items():  # zero advantages: zero gradient, Adam moves nothing
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_empty_and_fully_masked_completions_give_a_finite_loss(loss_type):
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    # an EOS-only completion, a truncated one masked out (mask_truncated), and one of 3 tokens
    mask = grpo.apply_truncation_mask(
        torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool), torch.tensor([False, True, False])
    )
    assert mask.sum(dim=1).tolist() == [1, 0, 3]
    cfg = LossConfig(loss_type=loss_type)
    weights = grpo.token_weights(mask, loss_type)
    loss, stats = grpo.grpo_loss(logp, logp.detach(), None, torch.tensor([1.0, -1.0, 0.5]), weights, cfg)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert logp.grad[1].tolist() == [0.0, 0.0, 0.0]  # the masked completion teaches nothing
    all_masked = torch.zeros_like(mask)
    weights = grpo.token_weights(all_masked, loss_type)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, torch.ones(3), weights, cfg)
    assert loss.item() == 0.0


def test_every_completion_truncated_and_masked_trains_on(tiny_qwen2_vl, tmp_path):
    # max_new_tokens=1: every completion is one token, and truncated unless that token is EOS
    module = _module(
        tiny_qwen2_vl, sampling=SamplingConfig(max_new_tokens=1), loss=LossConfig(mask_truncated=True)
    )
    trainer, (row,) = train(module, [_batch(module)], 1, tmp_path)
    assert float(row["train/completion_length"]) == 1.0 and 0.0 <= float(row["train/truncated_ratio"]) <= 1.0
    assert math.isfinite(float(row["train/loss"])) and module.skipped_steps == 0 and trainer.global_step == 1


def test_a_batch_whose_images_all_failed_is_skipped_with_a_warning(tiny_qwen2_vl, tmp_path):
    data = DetectionDataModule(train=[[]], repeat_train=False)
    failed = TrackedBatch(None, "train", 0, 1, 2, ["missing_image", "corrupt_image"])
    with pytest.warns(
        UserWarning, match=r"batch of 2 samples skipped: no image .*corrupt_image, missing_image"
    ):
        assert data.on_before_batch_transfer(failed, 0) is None
    assert data.skipped == {"missing_image": 1, "corrupt_image": 1}

    # Lightning does not call training_step with None: the batch is passed over, max_steps counts real steps.
    module = _module(tiny_qwen2_vl)
    calls = []
    step = module.training_step
    module.training_step = lambda batch, batch_idx: calls.append(batch is None) or step(batch, batch_idx)
    batch = _batch(module)
    with pytest.warns(UserWarning, match="yielded None"):
        trainer, _ = train(module, [None, batch, None, batch], 2, tmp_path)
    assert calls == [False, False] and trainer.global_step == 2


def _nan_once(monkeypatch, what: str) -> None:
    """Make the first micro-batch's loss (``what="loss"``) or gradient (``"grad"``) NaN."""
    real = grpo.grpo_loss
    calls = []

    def patched(logp, *args, **kwargs):
        loss, stats = real(logp, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            if what == "loss":
                loss = loss * float("nan")
            else:
                logp.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        return loss, stats

    monkeypatch.setattr(module_mod.grpo, "grpo_loss", patched)


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_and_training_goes_on(tiny_qwen2_vl, tmp_path, monkeypatch, what):
    module = _module(tiny_qwen2_vl)
    before = _weights(module)
    _nan_once(monkeypatch, what)
    batch = _batch(module)
    seen = []

    step = module.training_step

    def training_step(batch, batch_idx):  # the weights after each step
        out = step(batch, batch_idx)
        seen.append(_weights(module))
        return out

    module.training_step = training_step
    trainer, rows = train(module, [batch] * 3, 2, tmp_path)
    assert [float(r["train/skipped_steps"]) for r in rows] == [1.0, 1.0, 1.0]
    assert trainer.global_step == 2 and module.skipped_steps == 1
    for name, value in seen[0].items():  # the skipped step changed nothing
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(seen[2][n], before[n]) for n in before)  # the later ones trained


def test_on_nonfinite_raise_stops(tiny_qwen2_vl, tmp_path, monkeypatch):
    module = _module(tiny_qwen2_vl, on_nonfinite="raise")
    _nan_once(monkeypatch, "loss")
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 0"):
        train(module, [_batch(module)] * 2, 2, tmp_path)
