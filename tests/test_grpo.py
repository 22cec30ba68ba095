"""GRPO maths against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dip_r1 import logprobs
from dip_r1.config import IS_LEVELS, LossConfig
from dip_r1.grpo import (
    LOSS_TYPES,
    apply_truncation_mask,
    cispo_surrogate,
    clipped_surrogate,
    completion_mask,
    group_advantages,
    grpo_loss,
    kl_k3,
    token_logprobs,
    token_weights,
    zero_std_mask,
)

REWARDS = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])  # B = 2 prompts, G = 3


def close(a, b, tol=1e-4):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=tol, rtol=0)


# ---------------------------------------------------------------- advantages


def test_group_advantages_group_scale():
    # group 1: mean 2, deviations -1 0 1, population std sqrt(2/3)
    # group 2: mean 1, deviations -1 -1 2, population std sqrt(6/3) = sqrt(2)
    s1, s2 = math.sqrt(2 / 3), math.sqrt(2)
    expected = [-1 / s1, 0.0, 1 / s1, -1 / s2, -1 / s2, 2 / s2]
    close(group_advantages(REWARDS, 3, eps=0.0), expected)
    # eps is added to the std
    close(group_advantages(REWARDS, 3, eps=0.5)[0], -1 / (s1 + 0.5))


def test_group_advantages_batch_and_none():
    # whole batch: mean 1.5, population variance (0.25 + 0.25 + 2.25 * 4) / 6 = 9.5 / 6
    std = math.sqrt(9.5 / 6)
    close(group_advantages(REWARDS, 3, "batch", eps=0.0), [v / std for v in [-1, 0, 1, -1, -1, 2]])
    close(group_advantages(REWARDS, 3, "none"), [-1.0, 0.0, 1.0, -1.0, -1.0, 2.0])
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 3, "std")


def test_group_advantages_equal_rewards_and_single_sample():
    close(group_advantages(torch.tensor([0.7, 0.7, 0.1, 0.9]), 2), [0.0, 0.0, -0.9998, 0.9998])
    close(group_advantages(torch.tensor([0.3, 5.0]), 1), [0.0, 0.0])  # G = 1: finite, zero


def test_zero_std_mask():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5])
    assert zero_std_mask(rewards, 3).tolist() == [True] * 3 + [False] * 3 + [True] * 3
    assert zero_std_mask(REWARDS, 3).tolist() == [False] * 6


# ---------------------------------------------------------------- log-probs


def test_token_logprobs_by_hand_with_temperature():
    logits = torch.log(torch.tensor([[[1.0, 3.0]]]))  # probs 1/4, 3/4
    close(token_logprobs(logits, torch.tensor([[1]])), [[math.log(0.75)]])
    # temperature 2 halves the logits: probs 1 : sqrt(3)
    close(token_logprobs(logits, torch.tensor([[0]]), temperature=2.0), [[-math.log(1 + math.sqrt(3))]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_matches_log_softmax_value_and_grad(monkeypatch, dtype):
    monkeypatch.setattr(logprobs, "_CHUNK_ELEMENTS", 2 * 5 * 7)  # two rows per chunk: 3 chunks for N = 5
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(5, 7, 11, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 11, (5, 7), generator=g)
    upstream = torch.randn(5, 7, generator=g)

    ours = base.clone().requires_grad_(True)
    out = token_logprobs(ours, labels, temperature=0.7)
    (out * upstream).sum().backward()

    ref = base.clone().requires_grad_(True)
    expected = torch.log_softmax(ref.float() / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    (expected * upstream).sum().backward()

    assert out.dtype == torch.float32
    close(out, expected, 1e-5)
    assert ours.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    close(ours.grad, ref.grad, tol)


# ---------------------------------------------------------------- masks


def test_completion_mask_eos_padding_truncation():
    ids = torch.tensor(
        [
            [4, 5, 9, 0, 0],  # eos 9 at position 2, then pad
            [4, 8, 5, 9, 8],  # eos 8 (second eos id) at position 1
            [4, 5, 6, 7, 3],  # no eos: truncated, all tokens real
            [4, 5, 0, 0, 0],  # no eos: truncated, padded
        ]
    )
    mask, truncated = completion_mask(ids, eos_token_id=[9, 8], pad_token_id=0)
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, True]
    assert mask.dtype == torch.bool and truncated.dtype == torch.bool


def test_completion_mask_pad_equal_to_eos_keeps_the_first_eos():
    mask, truncated = completion_mask(
        torch.tensor([[4, 2, 2, 2], [2, 2, 2, 2]]), eos_token_id=2, pad_token_id=2
    )
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, False]


def test_apply_truncation_mask():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    out = apply_truncation_mask(mask, torch.tensor([False, True, False]))
    assert out.int().tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]


# ---------------------------------------------------------------- KL and surrogate


def test_kl_k3_values_and_gradient_pulls_toward_ref():
    # ref - logp = 1: e - 2 ; = -1: 1/e ; = 0: 0
    close(
        kl_k3(torch.tensor([0.0, -1.0, -2.0]), torch.tensor([1.0, -2.0, -2.0])), [math.e - 2, 1 / math.e, 0.0]
    )
    logp = torch.tensor([0.0, -3.0, -1.0], requires_grad=True)
    ref = torch.tensor([-1.0, -2.0, -1.0])
    kl_k3(logp, ref).sum().backward()
    # d/dlogp = 1 - exp(ref - logp)
    close(logp.grad, [1 - math.exp(-1), 1 - math.e, 0.0])
    stepped = logp.detach() - 0.1 * logp.grad
    assert (stepped - ref).abs()[:2].lt((logp.detach() - ref).abs()[:2]).all()


def test_clipped_surrogate_by_hand():
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]]))
    old = torch.zeros(2, 3)
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([1.0, -1.0]))
    # A = +1: -min(r, clip(r)) ; A = -1: max(r, clip(r)) with clip to [0.8, 1.2]
    close(loss, [[-0.5, -1.0, -1.2], [0.8, 1.0, 1.5]])
    assert clipped.tolist() == [[False, False, True], [True, False, False]]
    loss, clipped = clipped_surrogate(
        logp, old, torch.tensor([1.0, -1.0]), epsilon_low=0.6, epsilon_high=0.28
    )
    close(loss, [[-0.5, -1.0, -1.28], [0.5, 1.0, 1.5]])
    assert clipped.tolist() == [[False, False, True], [False, False, False]]


def test_clipped_surrogate_on_policy_gradient_is_minus_advantage():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    loss, clipped = clipped_surrogate(logp, logp.detach(), torch.tensor([2.0, -0.5]))
    loss.sum().backward()
    close(loss, [[-2.0, -2.0], [0.5, 0.5]])  # ratio 1
    close(logp.grad, [[-2.0, -2.0], [0.5, 0.5]])
    assert not clipped.any()


# ---------------------------------------------------------------- aggregation

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)


def aggregate(per_token, mask, loss_type, max_completion_length=None, num_sequences=None):
    return (per_token * token_weights(mask, loss_type, max_completion_length, num_sequences)).sum()


def test_token_weights_aggregate_by_hand():
    close(aggregate(PER_TOKEN, MASK, "grpo"), ((1 + 2) / 2 + 4) / 2)  # 2.75
    close(aggregate(PER_TOKEN, MASK, "bnpo"), 7 / 3)
    close(aggregate(PER_TOKEN, MASK, "dr_grpo"), 7 / (2 * 3))
    close(aggregate(PER_TOKEN, MASK, "dr_grpo", max_completion_length=4), 7 / 8)
    close(aggregate(PER_TOKEN, MASK, "dr_grpo", max_completion_length=4, num_sequences=7), 7 / 28)
    close(aggregate(PER_TOKEN, MASK, "grpo", num_sequences=4), (1.5 + 4) / 4)
    with pytest.raises(ValueError):
        aggregate(PER_TOKEN, MASK, "mean")


def test_token_weights_by_hand_and_empty_sequence():
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    close(token_weights(mask, "grpo"), [[1 / 12] * 4, [1 / 3, 0, 0, 0], [0.0] * 4])
    close(token_weights(mask, "bnpo"), [[0.2] * 4, [0.2, 0, 0, 0], [0.0] * 4])
    close(token_weights(mask, "dr_grpo", 8), [[1 / 24] * 4, [1 / 24, 0, 0, 0], [0.0] * 4])


@pytest.mark.parametrize("level", IS_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_sum_to_full_batch_loss(loss_type, level):
    g = torch.Generator().manual_seed(1)
    n, t = 7, 6
    logp = -torch.rand(n, t, generator=g) * 3
    old = logp + 0.3 * torch.randn(n, t, generator=g)
    ref = logp + 0.3 * torch.randn(n, t, generator=g)
    adv = torch.randn(n, generator=g)
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 4])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    cispo_bound = 1.2 if loss_type == "cispo" else 0.2  # CISPO's bound on the weight itself
    cfg = LossConfig(
        beta=0.04, loss_type=loss_type, epsilon_high=cispo_bound, importance_sampling_level=level
    )
    weights = token_weights(mask, loss_type, 8)

    full, _ = grpo_loss(logp, old, ref, adv, weights, cfg)
    parts = [
        grpo_loss(logp[mb], old[mb], ref[mb], adv[mb], weights[mb], cfg)[0]
        for mb in (slice(0, 3), slice(3, 4), slice(4, 7))
    ]
    close(sum(parts), full, 1e-6)
    level = {"mask": mask, "importance_sampling_level": level}
    if loss_type == "cispo":
        per_token, _ = cispo_surrogate(logp, old, adv, cfg.epsilon_high, **level)
    else:
        per_token, _ = clipped_surrogate(logp, old, adv, **level)
    close(full, aggregate(per_token + 0.04 * kl_k3(logp, ref), mask, loss_type, 8), 1e-6)


# ---------------------------------------------------------------- the whole loss


def test_grpo_loss_kl_term_only_with_beta():
    logp = torch.zeros(2, 2)
    ref = torch.full((2, 2), -1.0)  # k3 = exp(-1) - (-1) - 1 = 1/e per token
    weights = token_weights(torch.tensor([[1, 1], [1, 0]]))
    adv = torch.tensor([0.0, 0.0])
    loss, stats = grpo_loss(logp, logp, ref, adv, weights, LossConfig(beta=0.5))
    close(loss, 0.5 / math.e)
    close(stats["kl"], 1 / math.e)
    loss, stats = grpo_loss(logp, logp, ref, adv, weights, LossConfig(beta=0.0))
    close(loss, 0.0)
    close(stats["kl"], 1 / math.e)  # still measured when a reference is given
    _, stats = grpo_loss(logp, logp, None, adv, weights)
    close(stats["kl"], 0.0)
    with pytest.raises(ValueError):
        grpo_loss(logp, logp, None, adv, weights, LossConfig(beta=0.1))


def test_grpo_loss_clip_ratio_counts_masked_tokens_only():
    logp = torch.log(torch.tensor([[1.5, 1.5, 1.0], [0.5, 1.0, 0.5]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the clipped token at [1, 2] is masked out
    _, stats = grpo_loss(logp, torch.zeros(2, 3), None, torch.tensor([1.0, -1.0]), token_weights(mask))
    close(stats["clip_ratio"], 3 / 4)  # [0, 0], [0, 1], [1, 0]


def test_one_sgd_step_follows_the_advantage_sign_and_ignores_truncated():
    torch.manual_seed(0)
    logits = torch.zeros(3, 4, 5, requires_grad=True)  # [N, T, V]
    labels = torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3], [4, 4, 4, 4]])
    mask, truncated = completion_mask(labels, eos_token_id=3)
    mask = apply_truncation_mask(mask, truncated)  # row 2 has no EOS
    assert mask.int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    adv = torch.tensor([1.0, -1.0, 5.0])

    before = token_logprobs(logits, labels)
    loss, _ = grpo_loss(before, before.detach(), None, adv, token_weights(mask))
    loss.backward()
    with torch.no_grad():
        logits -= 1.0 * logits.grad
    after = token_logprobs(logits.detach(), labels)

    assert (after[0, :3] > before[0, :3]).all()  # positive advantage: more likely
    assert (after[1] < before[1]).all()  # negative advantage: less likely
    assert torch.equal(logits.grad[2], torch.zeros(4, 5))  # truncated: no gradient
    assert torch.equal(logits.grad[0, 3], torch.zeros(5))  # after EOS: no gradient
    # uniform start: d logp / d z_label = 1 - 1/5, weight 1 / (3 tokens * 3 sequences)
    close(logits.grad[0, 0, 1], -(1 - 0.2) / 9, 1e-6)
