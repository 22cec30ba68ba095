"""GRPOModule on tiny models: it learns, LoRA moves only adapters, QLoRA trains, the reference is right."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import Repeat, prompt_batch, sample, toy_targets

from dip_r1.config import LossConfig, SamplingConfig
from dip_r1.models import LoraSpec, PolicySpec
from dip_r1.module import GRPOModule
from dip_r1.rewards import GroupReward, RewardSuite


class DigitReward(GroupReward):
    """Toy task: the share of characters that are digits, brackets or commas (a random policy writes few)."""

    def score(self, completions, targets, group_size):
        return torch.tensor(
            [sum(c in "0123456789[]," for c in p.text) / max(len(p.text), 1) for p in completions]
        )


def _fit(module: GRPOModule, steps: int, tmp_path, batch=None) -> list[float]:
    """Train ``steps`` optimiser steps on one fixed batch; return the logged train/reward per step."""
    from lightning.pytorch.loggers import CSVLogger

    module.configure_model()
    batch = batch or {"inputs": prompt_batch(module.processor), "targets": toy_targets(2)}
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(Repeat(batch), batch_size=None))
    import csv

    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    return [float(r["train/reward"]) for r in rows if r.get("train/reward")]


def _module(path, **kw) -> GRPOModule:
    defaults = dict(
        rewards=RewardSuite({"digits": DigitReward()}),
        group_size=8,
        sampling=SamplingConfig(max_new_tokens=8),
        micro_batch_size=8,
        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
    )
    return GRPOModule(
        PolicySpec(path, lora=kw.pop("lora", None), quantization=kw.pop("quantization", None)),
        **{**defaults, **kw},
    )


def test_grpo_raises_the_reward_on_a_toy_task(tiny_qwen2_vl, tmp_path):
    # End to end: the signs of advantage, ratio and masking must be right for the reward to climb.
    L.seed_everything(0)
    rewards = _fit(_module(tiny_qwen2_vl), 40, tmp_path)
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert len(rewards) == 40
    assert last > first + 0.2, (first, last)


def test_logs_every_documented_metric(tiny_qwen2_vl, tmp_path):
    import csv

    L.seed_everything(0)
    _fit(_module(tiny_qwen2_vl, loss=LossConfig(beta=0.1)), 2, tmp_path)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        header = next(csv.reader(f))
    for key in (
        "train/reward",
        "train/reward/std",
        "train/reward_digits",
        "train/kl",
        "train/clip_ratio",
        "train/entropy",
        "train/completion_length",
        "train/truncated_ratio",
        "train/zero_std_ratio",
        "train/zero_std_ratio_digits",
        "train/tokens_per_s",
        "train/step_s",
        "train/skipped_steps",
    ):
        assert key in header, key


def test_lora_moves_adapters_only_and_reference_is_the_base(tiny_model, tmp_path):
    L.seed_everything(0)
    module = _module(tiny_model, lora=LoraSpec(r=4, dropout=0.0), loss=LossConfig(beta=0.1))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    batch = {"inputs": prompt_batch(module.processor), "targets": toy_targets(2)}
    torch.manual_seed(1)
    rollout_inputs = batch["inputs"]
    from dip_r1.scoring import all_logprobs

    ids = module.token_ids
    rollout = sample(
        module.policy, rollout_inputs, group_size=2, max_new_tokens=6, eos=list(ids.eos), pad=ids.pad
    )
    initial = all_logprobs(module.policy, rollout_inputs, rollout, micro_batch_size=4)
    _fit(module, 3, tmp_path, batch)
    moved = [n for n, p in module.policy.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all("lora_" in n for n in moved)
    assert any("lora_B" in n for n in moved)
    # the reference (adapters disabled) still scores exactly like the initial policy
    torch.testing.assert_close(module._logprobs(rollout_inputs, rollout, reference=True), initial)
    assert not torch.allclose(
        all_logprobs(module.policy, rollout_inputs, rollout, micro_batch_size=4), initial
    )


def test_lora_checkpoint_holds_only_trainable_weights(tiny_qwen2_vl, tmp_path):
    module = _module(tiny_qwen2_vl, lora=LoraSpec(r=4))
    module.configure_model()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])


def test_qlora_trains_on_cpu_with_finite_loss(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    import csv

    L.seed_everything(0)
    module = _module(tiny_model, lora=LoraSpec(r=4, dropout=0.0), quantization="4bit")
    module.configure_model()
    assert any(type(m).__name__ == "Linear4bit" for m in module.policy.modules())
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    _fit(module, 2, tmp_path)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_parameters() if p.requires_grad)


def test_two_iterations_on_one_rollout(tiny_model, tmp_path):
    L.seed_everything(0)
    module = _module(tiny_model, lora=LoraSpec(r=4), num_iterations=2, loss=LossConfig(beta=0.05))
    rewards = _fit(module, 2, tmp_path)  # two iterations on one rollout = two optimiser steps
    assert len(rewards) == 1


def test_no_reference_pass_when_beta_is_zero_and_no_old_logprobs_for_one_iteration(
    tiny_qwen2_vl, tmp_path, monkeypatch
):
    import dip_r1.module as module_mod

    module = _module(tiny_qwen2_vl, loss=LossConfig(beta=0.0), num_iterations=1)
    assert module.ref_model is None
    module.configure_model()
    assert module.ref_model is None  # full fine-tuning, but beta == 0: no frozen copy either

    def boom(*args, **kwargs):
        raise AssertionError("extra forward pass")

    monkeypatch.setattr(module, "_logprobs", boom)
    monkeypatch.setattr(module_mod, "all_logprobs", boom)
    _fit(module, 1, tmp_path)


def test_skips_a_batch_whose_images_all_failed(tiny_qwen2_vl):
    module = _module(tiny_qwen2_vl)
    with pytest.warns(UserWarning, match="no image could be loaded"):
        assert module.training_step(None, 0) is None


def test_missing_model_path_fails_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="^model at .*nowhere: no such folder"):
        _module(str(tmp_path / "nowhere"))


def test_one_step_on_the_contributing_guide_dataset(tiny_qwen2_vl, tmp_path):
    # CONTRIBUTING.md's 20-line reader, through the DataModule, trains a GRPO step.
    from PIL import Image
    from test_sources import CSVBoxes

    from dip_r1.data import DetectionDataModule

    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 48), (120, 30, 200)).save(tmp_path / name)
    (tmp_path / "boxes.csv").write_text(
        "a.jpg,1,2,30,40,person\nb.jpg,5,5,20,20,person\nb.jpg,30,8,60,40,person\n"
    )
    L.seed_everything(0)
    module = _module(tiny_qwen2_vl)
    data = DetectionDataModule(train=[CSVBoxes(str(tmp_path / "boxes.csv"), str(tmp_path))], batch_size=2)
    data.connect(module.processor, **module.data_spec())
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, data)
    assert trainer.global_step == 1
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "loss",
    [
        LossConfig(loss_type="dapo", importance_sampling_level="sequence"),
        LossConfig(loss_type="cispo", epsilon_high=5.0, top_entropy_quantile=0.2, beta=0.05),
    ],
    ids=["dapo-gspo", "cispo-entropy-kl"],
)
def test_each_loss_variant_trains(tiny_qwen2_vl, tmp_path, loss):
    import csv

    L.seed_everything(0)
    module = _module(tiny_qwen2_vl, lora=LoraSpec(r=4, dropout=0.0), loss=loss)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    _fit(module, 2, tmp_path)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 2 and all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert all(float(r["train/entropy"]) > 0 for r in rows)
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_parameters() if p.requires_grad)
