"""GSPO, DAPO, CISPO and high-entropy tokens: by hand, and against TRL's own loss code on random tensors."""

from __future__ import annotations

import itertools
import math
import types
from collections import defaultdict

import pytest
import torch

from dip_r1.config import LossConfig
from dip_r1.grpo import (
    cispo_surrogate,
    clipped_surrogate,
    grpo_loss,
    high_entropy_mask,
    log_importance_weights,
    token_logprobs,
    token_weights,
)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=tol, rtol=0)


def loss_of(logp, old, ref, adv, mask, weights=None, entropy_mask=None, **config):
    """``grpo_loss`` with the whole batch's weights for ``config``'s loss type (``LossConfig`` fields)."""
    config = LossConfig(**config)
    if weights is None:
        weights = token_weights(mask, config.loss_type, MAX_LEN)
    return grpo_loss(logp, old, ref, adv, weights, config, entropy_mask=entropy_mask)


# ---------------------------------------------------------------- by hand, no TRL


def test_gspo_one_ratio_per_sequence_clipped_and_its_gradient():
    # log-ratios ln 2 and 0 on the two real tokens: the sequence ratio is exp(ln 2 / 2) = sqrt 2
    logp = torch.tensor([[math.log(2.0), 0.0, 7.0]], requires_grad=True)
    old, mask = torch.zeros(1, 3), torch.tensor([[1, 1, 0]])
    close(log_importance_weights(logp, old, mask, "sequence"), [[math.log(2.0) / 2]])
    # A = +1: sqrt 2 > 1.2 is clipped, loss -1.2 with no gradient
    loss, stats = loss_of(logp, old, None, torch.tensor([1.0]), mask, importance_sampling_level="sequence")
    close(loss, -1.2)
    close(stats["clip_ratio"], 1.0)
    loss.backward()
    close(logp.grad, [[0.0, 0.0, 0.0]])
    # A = -1: -min(-sqrt 2, -1.2) = sqrt 2; d/dlogp_t = r x (1 / len) x (weight sum 1) = sqrt 2 / 2
    logp.grad = None
    loss, stats = loss_of(logp, old, None, torch.tensor([-1.0]), mask, importance_sampling_level="sequence")
    close(loss, math.sqrt(2.0))
    close(stats["clip_ratio"], 0.0)
    loss.backward()
    close(logp.grad, [[math.sqrt(2.0) / 2, math.sqrt(2.0) / 2, 0.0]])
    with pytest.raises(ValueError, match="needs the completion mask"):
        clipped_surrogate(logp, old, torch.tensor([1.0]), importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        log_importance_weights(logp, old, mask, "token_mean")


def test_dapo_is_the_token_mean_of_the_whole_batch():
    # on policy the per-token loss is -A: -1, -1 (2 tokens) and -2 (1 token)
    logp = torch.zeros(2, 2)
    mask, adv = torch.tensor([[1, 1], [1, 0]]), torch.tensor([1.0, 2.0])
    close(loss_of(logp, logp, None, adv, mask, loss_type="dapo")[0], -4 / 3)
    close(loss_of(logp, logp, None, adv, mask, loss_type="grpo")[0], -1.5)  # (-1 + -2) / 2
    # under DDP each rank divides by the mean token count of the ranks (here 6): the averaged gradient is the
    # mean over all ranks' tokens
    weights = token_weights(mask, "dapo", num_tokens=6.0)
    close(weights, [[1 / 6, 1 / 6], [1 / 6, 0.0]])
    close(loss_of(logp, logp, None, adv, mask, weights, loss_type="dapo")[0], -4 / 6)


def test_cispo_clips_the_weight_but_every_token_keeps_its_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_(True)
    old = logp.detach() - torch.log(torch.tensor([[1.0, 8.0]]))  # ratios 1 and 8
    adv = torch.tensor([2.0])
    loss, stats = loss_of(logp, old, None, adv, torch.ones(1, 2), loss_type="cispo", epsilon_high=5.0)
    # token mean of -w A logp: (-1 x 2 x ln 0.5 - 5 x 2 x ln 0.25) / 2
    close(loss, (-2 * math.log(0.5) - 10 * math.log(0.25)) / 2, 1e-5)
    close(stats["clip_ratio"], 0.5)  # the ratio 8 > 5 with A > 0
    loss.backward()
    close(logp.grad, [[-1.0, -5.0]])  # -w A / 2: the clipped token still has a gradient
    # the clipped PPO surrogate gives the clipped token none
    logp.grad = None
    loss_of(logp, old, None, adv, torch.ones(1, 2), loss_type="dapo", epsilon_high=5.0)[0].backward()
    close(logp.grad, [[-1.0, 0.0]])
    _, clipped = cispo_surrogate(logp, old, -adv, 5.0)
    assert not clipped.any()  # a negative advantage is never counted as clipped


def test_entropy_from_the_logprob_pass_by_hand():
    probs = torch.tensor([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]])
    logp, entropy = token_logprobs(torch.log(probs), torch.tensor([[0, 1]]), with_entropy=True)
    close(entropy, [[1.5 * math.log(2.0), math.log(3.0)]])
    close(logp.exp(), [[0.5, 1 / 3]])
    assert not entropy.requires_grad
    # temperature 2 halves the logits: probs 1 : 3 become 1 : sqrt 3
    _, entropy = token_logprobs(
        torch.log(torch.tensor([[[1.0, 3.0]]])), torch.tensor([[0]]), 2.0, with_entropy=True
    )
    p = 1 / (1 + math.sqrt(3))
    close(entropy, [[-(p * math.log(p) + (1 - p) * math.log(1 - p))]])


def test_high_entropy_mask_and_loss_on_those_tokens_only():
    entropies = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # the 0.6 quantile of 0.1 ... 0.5 is 0.3 + 0.4 x 0.1 = 0.34: tokens 0.4 and 0.5 (9.0 is padding)
    keep = high_entropy_mask(entropies, mask, 0.4)
    assert keep.tolist() == [[False, False, False], [True, True, False]]
    assert high_entropy_mask(entropies, mask, 1.0).tolist() == mask.bool().tolist()
    assert not high_entropy_mask(entropies, torch.zeros(2, 3), 0.2).any()
    # the surrogate counts on kept tokens only, the weights and the KL on all: "dapo" divides by 5
    logp, ref = torch.zeros(2, 3), torch.full((2, 3), -1.0)  # k3 = 1/e per token
    adv = torch.tensor([1.0, 3.0])
    loss, _ = loss_of(logp, logp, ref, adv, mask, entropy_mask=keep, beta=0.5, loss_type="dapo")
    close(loss, (-3.0 - 3.0 + 5 * 0.5 / math.e) / 5)


# ---------------------------------------------------------------- against TRL's own code

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
MAX_LEN = 9


class _OneProcess:
    """The accelerator calls TRL's loss makes, on a single process: gathers and reductions are identities."""

    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def _trl():
    grpo_trainer = pytest.importorskip(
        "trl.trainer.grpo_trainer", reason="TRL (1.16) is the reference for the GRPO loss variants"
    )
    import trl

    if tuple(int(p) for p in trl.__version__.split(".")[:2]) < (1, 16):
        pytest.skip(f"the stand-in follows TRL 1.16's _compute_loss; installed {trl.__version__}")
    return grpo_trainer


def _trl_trainer(grpo_trainer, logp, entropies, **settings):
    """The smallest ``self`` on which TRL's unbound ``GRPOTrainer._compute_loss`` runs its own code path: the
    model forward is replaced by the given log-probs and entropies, the accelerator by one process.
    ``settings``: TRL's attributes of the same names (loss_type, beta, epsilon_low, ...)."""
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda model, *args, **kwargs: (logp, entropies, None),
        off_policy_mask_threshold=None,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_LEN,
        accelerator=_OneProcess(),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        **settings,
    )
    trainer.get_high_entropy_mask = types.MethodType(grpo_trainer.GRPOTrainer.get_high_entropy_mask, trainer)
    return trainer


def _random_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    n, t = 6, 7
    base = -torch.rand(n, t, generator=g) * 3
    old = base + 0.4 * torch.randn(n, t, generator=g)  # off policy: ratios from about 0.3 to 3
    ref = base + 0.3 * torch.randn(n, t, generator=g)
    adv = torch.randn(n, generator=g)
    entropies = torch.rand(n, t, generator=g) * 4
    lengths = torch.tensor([7, 1, 3, 5, 2, 6])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return base, old, ref, adv, entropies, mask


CASES = list(itertools.product(LOSS_TYPES, ("token", "sequence"), (1.0, 0.3), (0.0, 0.04)))


@pytest.mark.parametrize(("loss_type", "level", "quantile", "beta"), CASES)
def test_loss_and_gradient_equal_trl(loss_type, level, quantile, beta):
    grpo_trainer = _trl()
    base, old, ref, adv, entropies, mask = _random_batch(CASES.index((loss_type, level, quantile, beta)))
    settings = {
        "loss_type": loss_type,
        "importance_sampling_level": level,
        "beta": beta,
        "epsilon_low": 0.2,
        "epsilon_high": 1.5 if loss_type == "cispo" else 0.28,  # both clip some tokens
    }

    theirs = base.clone().requires_grad_(True)
    trainer = _trl_trainer(grpo_trainer, theirs, entropies, top_entropy_quantile=quantile, **settings)
    n, t = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(n, 2, dtype=torch.long),
        "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    expected = grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)
    expected.backward()

    ours = base.clone().requires_grad_(True)
    keep = high_entropy_mask(entropies, mask, quantile) if quantile < 1 else None
    ref_logp = ref if beta > 0 else None
    loss, stats = loss_of(ours, old, ref_logp, adv, mask, entropy_mask=keep, **settings)
    loss.backward()
    close(loss, expected)
    close(ours.grad, theirs.grad)
    if beta > 0:
        close(stats["kl"], trainer._metrics["train"]["kl"][0])
    if loss_type == "cispo":
        close(stats["clip_ratio"], trainer._metrics["train"]["cispo_clip_ratio"][0])
    elif level == "token":  # sequence level: TRL counts sequences, we count their tokens
        close(stats["clip_ratio"], trainer._metrics["train"]["clip_ratio/region_mean"][0])


@pytest.mark.parametrize("quantile", [0.0, 0.2, 0.5, 1.0])
def test_high_entropy_mask_equals_trl(quantile):
    grpo_trainer = _trl()
    _, _, _, _, entropies, mask = _random_batch(3)
    trainer = types.SimpleNamespace(accelerator=_OneProcess())
    expected = grpo_trainer.GRPOTrainer.get_high_entropy_mask(trainer, entropies, mask, 1 - quantile)
    assert high_entropy_mask(entropies, mask, quantile).tolist() == expected.tolist()


def test_entropy_equals_trl():
    _trl()
    from trl.trainer.utils import entropy_from_logits

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 6, 40, generator=g) * 3
    labels = torch.randint(0, 40, (5, 6), generator=g)
    _, entropy = token_logprobs(logits, labels, temperature=0.7, with_entropy=True)
    close(entropy, entropy_from_logits(logits / 0.7))
