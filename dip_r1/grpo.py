"""The GRPO objective as pure torch functions: advantages, log-probs, masks, surrogate, KL, loss.

GRPO (DeepSeekMath, arXiv 2402.03300) samples ``G`` completions per prompt, scores them, and uses
the reward minus the group's mean reward (optionally divided by a standard deviation) as the
advantage of every token of that completion; there is no value network. The per-token objective is
PPO's clipped surrogate plus ``beta`` times a KL penalty to a frozen reference policy.

Layout: completions are prompt-major, ``B * G`` of them, completion ``j`` belongs to prompt
``j // G``. Per-token tensors are ``[N, T]`` with ``N`` completions and ``T`` completion positions.

Where this differs from the paper and from TRL's ``GRPOTrainer``:

- KL: Schulman's k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` (as the paper and TRL), added
  to the per-token loss, and only when ``beta > 0`` (DAPO and Dr.GRPO use ``beta = 0``, which also
  saves the reference forward pass).
- Clipping: separate ``epsilon_low`` / ``epsilon_high`` ("clip-higher" from DAPO, arXiv 2503.14476).
- Importance sampling: per token (PPO, the paper) or, with ``importance_sampling_level="sequence"``,
  one ratio per completion, ``exp(mean over its tokens of logp - old_logp)`` (GSPO, arXiv 2507.18071;
  TRL's option of the same name), clipped like the token ratio.
- Aggregation: ``loss_type`` "grpo" (paper: mean per sequence, then over sequences), "bnpo" (mean
  over the completion tokens of this rank's batch), "dapo" (the same mean over the active tokens of the
  whole batch on every rank, DAPO's token-level loss and TRL's default) and "dr_grpo" (sum / (N x max
  length), from Dr.GRPO, arXiv 2503.20783, which removes the length bias). All are written as fixed
  per-token weights (:func:`token_weights`) so a loss computed over micro-batches of completions
  with gradient accumulation sums to exactly the full-batch loss (TRL's "bnpo" normalises each
  micro-batch by its own tokens instead; ours is its full-batch value, so on one rank "bnpo" and
  "dapo" agree).
- "cispo" (MiniMax-M1, arXiv 2506.13585): ``-min(r, epsilon_high).detach() x A x logp``, aggregated as
  "dapo": the importance weight is clipped and detached, so every token keeps a gradient; here
  ``epsilon_high`` is the bound on the weight itself (ScaleRL recommends 5), not ``1 + epsilon_high``.
- Entropy: :func:`token_logprobs` can return each position's entropy from the same pass over the
  logits; ``top_entropy_quantile < 1`` keeps the surrogate (not the KL term) on the tokens at or above
  that quantile of the micro-batch's entropies only (:func:`high_entropy_mask`, "Beyond the 80/20
  rule", arXiv 2506.01939), as TRL takes it over its per-device batch.
- Dynamic sampling (DAPO; verl's ``filter_groups``) is not a loss term: ``GRPOModule(dynamic_sampling=True)``
  leaves out groups whose advantages are all 0 (:func:`zero_std_mask`) and draws more prompts inside the
  step (:mod:`dip_r1.dynamic_sampling`); TRL has no equivalent.
- Standard deviations are population ones (``unbiased=False``), TRL uses ``torch.std`` (unbiased):
  ours makes a group's advantages exactly unit-variance and is defined for ``G = 1``; the two differ
  by a factor ``sqrt((G - 1) / G)``.
- By default one gradient step per rollout (``num_iterations = 1``): then ``old_logp`` is
  ``logp.detach()``, the ratio is 1 with the gradient of the plain policy gradient, and clipping
  never fires. Several iterations reuse one rollout with the stored ``old_logp``.
- Credit: GRPO gives every token its completion's advantage. A reward that scores one block of the
  completion can instead reach that block's tokens only (:func:`block_advantages`, ``RewardSuite(credit)``,
  :mod:`dip_r1.credit`); the default suite does so with the look reward (``docs/look_reward.md`` says why).
- ``apply_truncation_mask`` drops completions that hit the length limit without an EOS (TRL's
  ``mask_truncated_completions``, recommended by DAPO): their reward judges an unfinished answer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dip_r1.config import IS_LEVELS, LOSS_TYPES, SCALES, LossConfig
from dip_r1.logprobs import token_logprobs as token_logprobs  # re-exported: part of the objective's API


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Reward minus its group's mean, divided by a std (population std, ``unbiased=False``).

    ``rewards``: ``Tensor[B*G]`` prompt-major. ``scale``: "group" divides by the group's std,
    "batch" by the std of all ``B*G`` rewards, "none" not at all. ``eps`` is added to the std (TRL).

    >>> group_advantages(torch.tensor([0.0, 1.0, 2.0, 2.0]), 2)
    tensor([-0.9998,  0.9998,  0.0000,  0.0000])
    >>> group_advantages(torch.tensor([0.0, 1.0, 2.0, 2.0]), 2, scale="none")
    tensor([-0.5000,  0.5000,  0.0000,  0.0000])
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    grouped = rewards.float().view(-1, group_size)  # [B, G]
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # [B*G]
    if scale == "group":
        std = grouped.std(dim=1, unbiased=False).repeat_interleave(group_size)  # [B*G]
    elif scale == "batch":
        std = rewards.float().std(unbiased=False)
    else:
        return advantages
    return advantages / (std + eps)


def block_advantages(advantages: Tensor, block_advantages: Tensor, block_mask: Tensor) -> Tensor:
    """Per-token advantages ``Tensor[N, T]``: ``block_advantages[i]`` on the tokens of ``block_mask[i]``,
    ``advantages[i]`` (or ``advantages[i, t]``) on every other token.

    ``advantages``: ``Tensor[N]`` or ``Tensor[N, T]``; ``block_advantages``: ``Tensor[N]``; ``block_mask``:
    ``Tensor[N, T]`` bool. With a reward that scores one block of the completion, ``block_advantages`` come
    from every reward and ``advantages`` from the others: the reward reaches only the tokens of that block.

    >>> block_advantages(torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.5]), torch.tensor([[0, 1], [0, 1]]).bool())
    tensor([[ 1.0000,  2.0000],
            [-1.0000,  0.5000]])
    """
    rest = advantages if advantages.dim() == 2 else advantages[:, None]  # [N, T] or [N, 1]
    return torch.where(block_mask, block_advantages[:, None].to(rest), rest).expand_as(block_mask)  # [N, T]


def zero_std_mask(rewards: Tensor, group_size: int) -> Tensor:
    """``Tensor[B*G]`` bool: the completion's group has all rewards equal (so zero advantage).

    >>> zero_std_mask(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2).tolist()
    [True, True, False, False]
    """
    grouped = rewards.view(-1, group_size)  # [B, G]
    flat = grouped.amax(dim=1) == grouped.amin(dim=1)  # [B]: exact, no tolerance
    return flat.repeat_interleave(group_size)


def completion_mask(
    completion_ids: Tensor, eos_token_id: int | list[int], pad_token_id: int | None = None
) -> tuple[Tensor, Tensor]:
    """Mask of real completion tokens: up to and including the first EOS.

    ``completion_ids``: ``Tensor[N, T]``. Returns ``(mask Tensor[N, T] bool, truncated Tensor[N]
    bool)``; truncated means no EOS at all (cut at the length limit). Pad tokens (when ``pad_token_id``
    is given and is not an EOS id) are masked too.

    >>> ids = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [5, 6, 0, 0]])  # eos 2, pad 0
    >>> mask, truncated = completion_mask(ids, eos_token_id=2, pad_token_id=0)
    >>> mask.int().tolist(), truncated.tolist()
    ([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], [False, True, True])
    """
    eos = torch.as_tensor(eos_token_id, device=completion_ids.device).view(-1)
    is_eos = torch.isin(completion_ids, eos)  # [N, T]
    has_eos = is_eos.any(dim=1)  # [N]
    t = completion_ids.shape[1]
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, t, dtype=torch.long))
    positions = torch.arange(t, device=completion_ids.device)
    mask = positions[None, :] <= first[:, None]  # [N, T]
    if pad_token_id is not None and not bool((eos == pad_token_id).any()):
        mask &= completion_ids != pad_token_id
    return mask, ~has_eos


def apply_truncation_mask(mask: Tensor, truncated: Tensor) -> Tensor:
    """Zero the ``mask`` (``Tensor[N, T]``) of truncated completions (``Tensor[N]`` bool).

    >>> apply_truncation_mask(torch.ones(2, 2, dtype=torch.bool), torch.tensor([False, True])).int().tolist()
    [[1, 1], [0, 0]]
    """
    return mask & ~truncated[:, None]


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimate of KL(policy || ref) per token: ``exp(ref - logp) - (ref - logp) - 1``.

    Non-negative, zero where ``logp == ref_logp``, unbiased for samples drawn from the policy.

    >>> kl_k3(torch.tensor([0.0, -1.0]), torch.tensor([0.0, 0.0]))
    tensor([0.0000, 0.7183])
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def log_importance_weights(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """Log of the importance ratio: ``logp - old_logp`` per token (``Tensor[N, T]``), or with ``level``
    "sequence" its mean over each completion's ``mask`` (GSPO), ``Tensor[N, 1]``.

    >>> log_importance_weights(torch.tensor([[0.0, -1.0, 5.0]]), torch.tensor([[-1.0, -1.0, 0.0]]),
    ...                        torch.tensor([[1, 1, 0]]), "sequence")
    tensor([[0.5000]])
    """
    log_ratio = logp - old_logp  # [N, T]
    if level == "token":
        return log_ratio
    if level != "sequence":
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {level!r}")
    m = mask.to(log_ratio.dtype)
    return ((log_ratio * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0))[:, None]  # [N, 1]


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    *,
    mask: Tensor | None = None,
    importance_sampling_level: str = "token",
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate loss per token, ``-min(r A, clip(r, 1 - el, 1 + eh) A)``.

    ``logp``, ``old_logp``: ``Tensor[N, T]``; ``advantages``: ``Tensor[N]`` (one per completion) or
    ``Tensor[N, T]`` (one per token, :func:`block_advantages`);
    ``r = exp(logp - old_logp)``, or one ratio per completion with ``importance_sampling_level``
    "sequence" (:func:`log_importance_weights`, needs ``mask``). Returns ``(per_token_loss Tensor[N, T],
    clipped Tensor[N, T] bool)``; ``clipped`` marks tokens whose clipped term is active (zero gradient), as TRL counts.

    >>> loss, clipped = clipped_surrogate(torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2), torch.tensor([1.0]))
    >>> loss, clipped
    (tensor([[-1.2000, -0.5000]]), tensor([[ True, False]]))
    """
    adv = advantages if advantages.dim() == 2 else advantages.reshape(-1, 1)  # [N, T] or [N, 1]
    ratio = torch.exp(_log_weights(logp, old_logp, mask, importance_sampling_level))  # [N, T] or [N, 1]
    unclipped = ratio * adv
    clipped_term = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    per_token = -torch.min(unclipped, clipped_term)
    clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return per_token.expand_as(logp), clipped.expand_as(logp)


def cispo_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    epsilon_high: float = 5.0,
    *,
    mask: Tensor | None = None,
    importance_sampling_level: str = "token",
) -> tuple[Tensor, Tensor]:
    """CISPO's loss per token, ``-min(r, epsilon_high).detach() x A x logp`` (MiniMax-M1, TRL's "cispo").

    The clipped weight carries no gradient, so every token gets ``-w A`` times the gradient of its
    log-prob, clipped or not. Shapes and ``r`` as :func:`clipped_surrogate`; ``clipped`` marks tokens
    with ``r > epsilon_high`` and ``A > 0`` (TRL's ``cispo_clip_ratio``).

    >>> logp = torch.log(torch.tensor([[0.5, 0.25]]))
    >>> loss, clipped = cispo_surrogate(logp, logp - torch.log(torch.tensor([[1.0, 8.0]])), torch.tensor([2.0]))
    >>> loss, clipped  # -1 x 2 x ln 0.5, -5 x 2 x ln 0.25
    (tensor([[ 1.3863, 13.8629]]), tensor([[False,  True]]))
    """
    adv = advantages if advantages.dim() == 2 else advantages.reshape(-1, 1)  # [N, T] or [N, 1]
    ratio = torch.exp(_log_weights(logp, old_logp, mask, importance_sampling_level)).detach()
    per_token = -torch.clamp(ratio, max=epsilon_high) * adv * logp  # [N, T]
    clipped = (ratio > epsilon_high) & (adv > 0)
    return per_token, clipped.expand_as(logp)


def _log_weights(logp: Tensor, old_logp: Tensor, mask: Tensor | None, level: str) -> Tensor:
    if level == "sequence" and mask is None:
        raise ValueError('importance_sampling_level "sequence" needs the completion mask')
    return log_importance_weights(logp, old_logp, mask, level)


def high_entropy_mask(entropies: Tensor, mask: Tensor, top_quantile: float) -> Tensor:
    """``Tensor[N, T]`` bool: the tokens of ``mask`` whose entropy is at least the ``1 - top_quantile``
    quantile (linear interpolation, ``torch.quantile``) of the entropies under ``mask``, as TRL's
    ``get_high_entropy_mask`` on one process; all False for an empty ``mask``.

    >>> high_entropy_mask(torch.tensor([[0.1, 0.9, 0.5, 0.3]]), torch.tensor([[1, 1, 1, 0]]), 0.5).tolist()
    [[False, True, True, False]]
    """
    m = mask.bool()
    values = entropies[m].float()
    if values.numel() == 0:
        return torch.zeros_like(m)
    threshold = torch.quantile(values, 1.0 - top_quantile)
    return (entropies * m >= threshold) & m


def token_weights(
    mask: Tensor,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
) -> Tensor:
    """Per-token weights ``Tensor[N, T]`` with ``loss = (per_token * weights).sum()``.

    Compute once on the full batch's ``mask`` (``Tensor[N, T]``), then a micro-batch ``mb`` adds
    ``(per_token[mb] * weights[mb]).sum()``; the micro-batch terms sum to the full-batch loss.
    "grpo": ``1 / (len_i * N)``; "bnpo": ``1 / total_tokens``; "dapo" and "cispo": ``1 / num_tokens``
    (default ``total_tokens``; under DDP the mean over ranks of their token counts, so that the averaged
    gradient is the whole batch's token mean, as TRL); "dr_grpo": ``1 / (N * L)``, with
    ``L = max_completion_length`` (default ``T``) and ``N = num_sequences`` (default ``mask.shape[0]``).
    Masked tokens get weight 0; an empty sequence still counts in ``N`` for "grpo" (as TRL).

    >>> token_weights(torch.tensor([[1, 1], [1, 0]]), "grpo")
    tensor([[0.2500, 0.2500],
            [0.5000, 0.0000]])
    """
    m = mask.float()
    n = mask.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        return m / (m.sum(dim=1, keepdim=True).clamp(min=1.0) * n)
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if loss_type in ("dapo", "cispo"):
        total = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=m.dtype, device=m.device)
        return m / total.clamp(min=1.0)
    if loss_type == "dr_grpo":
        return m / (n * (mask.shape[1] if max_completion_length is None else max_completion_length))
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask`` (same shape); 0 for an empty mask."""
    m = mask.float()
    return (values.float() * m).sum() / m.sum().clamp(min=1.0)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    weights: Tensor,
    config: LossConfig = LossConfig(),  # noqa: B008 (frozen: a shared default is safe)
    *,
    entropy_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss: surrogate (clipped, or CISPO's) + ``config.beta`` x k3 KL, weighted per token and summed.

    ``logp``, ``old_logp``, ``ref_logp``: ``Tensor[N, T]``; ``advantages``: ``Tensor[N]`` or ``Tensor[N, T]``;
    ``weights``: these rows of :func:`token_weights` of the whole batch (``config.loss_type``), 0 on tokens
    outside the loss, so that micro-batch losses sum to the full-batch loss. ``config.importance_sampling_level``
    "sequence" takes one ratio per completion over its weighted tokens (GSPO). ``entropy_mask`` (``Tensor[N, T]``
    bool, :func:`high_entropy_mask`): the surrogate counts on these tokens only; the weights and the KL term keep
    every token (as TRL). The KL term is added only when ``beta > 0``. Stats (detached, means over this call's
    weighted tokens): "kl" (0 when ``ref_logp`` is None), "clip_ratio" (CISPO: weights above ``epsilon_high``).

    >>> logp = torch.zeros(1, 2, requires_grad=True)
    >>> weights = token_weights(torch.ones(1, 2))
    >>> loss, stats = grpo_loss(logp, logp.detach(), None, torch.tensor([2.0]), weights)
    >>> loss.item(), stats["clip_ratio"].item()
    (-2.0, 0.0)
    """
    if config.beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    mask = weights > 0
    level = {"mask": mask, "importance_sampling_level": config.importance_sampling_level}
    if config.loss_type == "cispo":
        per_token, clipped = cispo_surrogate(logp, old_logp, advantages, config.epsilon_high, **level)
    else:
        per_token, clipped = clipped_surrogate(
            logp, old_logp, advantages, config.epsilon_low, config.epsilon_high, **level
        )
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else None
    if config.beta > 0:
        per_token = per_token + config.beta * kl
    loss = (per_token * weights).sum()
    stats = {
        "kl": masked_mean(kl.detach(), mask) if kl is not None else logp.new_zeros(()),
        "clip_ratio": masked_mean(clipped, mask),
    }
    return loss, stats
