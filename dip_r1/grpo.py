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
- Aggregation: ``loss_type`` "grpo" (paper: mean per sequence, then over sequences), "bnpo" (mean
  over all completion tokens, DAPO's token-level loss) and "dr_grpo" (sum / (N x max length), from
  Dr.GRPO, arXiv 2503.20783, which removes the length bias). All three are written as fixed
  per-token weights (:func:`token_weights`) so a loss computed over micro-batches of completions
  with gradient accumulation sums to exactly the full-batch loss.
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

from dip_r1.config import LOSS_TYPES, SCALES, LossConfig

_CHUNK_ELEMENTS = 1 << 24  # logits elements handled at once: 64 MB of float32 temporaries


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


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(logits / t)[label] with a chunked backward that saves no ``[N, T, V]`` copy."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        n, t, v = logits.shape
        rows = max(1, _CHUNK_ELEMENTS // max(1, t * v))
        out = torch.empty(n, t, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for i in range(0, n, rows):
            chunk = logits[i : i + rows].float() / temperature  # [n', T, V], float32 for accuracy
            lse[i : i + rows] = chunk.logsumexp(dim=-1)
            picked = chunk.gather(-1, labels[i : i + rows, :, None]).squeeze(-1)  # [n', T]
            out[i : i + rows] = picked - lse[i : i + rows]
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature, ctx.rows = temperature, rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ctx.rows):
            sl = slice(i, i + ctx.rows)
            g = grad_out[sl, :, None].float()  # [n', T, 1]
            # d logp / d z_v = (1[v == label] - softmax_v) / temperature
            probs = torch.exp(logits[sl].float() / ctx.temperature - lse[sl, :, None])  # [n', T, V]
            probs.mul_(-g).scatter_add_(-1, labels[sl, :, None], g)
            grad[sl] = probs.div_(ctx.temperature)
        return grad, None, None


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-prob of each label under ``softmax(logits / temperature)``, ``Tensor[N, T]`` float32.

    ``logits``: ``Tensor[N, T, V]`` (any float dtype; computed in float32), ``labels``:
    ``Tensor[N, T]`` of valid token ids (put e.g. the pad id at masked positions, not -100).
    Memory-light: works in chunks over ``N`` (logsumexp and gather, no full ``log_softmax``), and
    the backward recomputes the softmax chunk by chunk instead of saving a float32 copy.

    >>> logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))  # [1, 2, 3]
    >>> token_logprobs(logits, torch.tensor([[0, 2]])).exp()
    tensor([[0.5000, 0.8000]])
    """
    return _TokenLogProbs.apply(logits, labels, float(temperature))


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


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, epsilon_low: float = 0.2, epsilon_high: float = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate loss per token, ``-min(r A, clip(r, 1 - el, 1 + eh) A)``.

    ``logp``, ``old_logp``: ``Tensor[N, T]``; ``advantages``: ``Tensor[N]`` (one per completion) or
    ``Tensor[N, T]`` (one per token, :func:`block_advantages`);
    ``r = exp(logp - old_logp)``. Returns ``(per_token_loss Tensor[N, T], clipped Tensor[N, T]
    bool)``; ``clipped`` marks tokens whose clipped term is active (zero gradient), as TRL counts.

    >>> loss, clipped = clipped_surrogate(torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2), torch.tensor([1.0]))
    >>> loss, clipped
    (tensor([[-1.2000, -0.5000]]), tensor([[ True, False]]))
    """
    adv = advantages if advantages.dim() == 2 else advantages.reshape(-1, 1)  # [N, T] or [N, 1]
    ratio = torch.exp(logp - old_logp)  # [N, T]
    unclipped = ratio * adv
    clipped_term = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    per_token = -torch.min(unclipped, clipped_term)
    clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return per_token, clipped


def token_weights(
    mask: Tensor,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_sequences: int | None = None,
) -> Tensor:
    """Per-token weights ``Tensor[N, T]`` with ``loss = (per_token * weights).sum()``.

    Compute once on the full batch's ``mask`` (``Tensor[N, T]``), then a micro-batch ``mb`` adds
    ``(per_token[mb] * weights[mb]).sum()``; the micro-batch terms sum to the full-batch loss.
    "grpo": ``1 / (len_i * N)``; "bnpo": ``1 / total_tokens``; "dr_grpo": ``1 / (N * L)``, with
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
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss: clipped surrogate + ``config.beta`` x k3 KL, weighted per token and summed.

    ``logp``, ``old_logp``, ``ref_logp``: ``Tensor[N, T]``; ``advantages``: ``Tensor[N]`` or ``Tensor[N, T]``;
    ``weights``: these rows of :func:`token_weights` of the whole batch (``config.loss_type``), 0 on tokens
    outside the loss, so that micro-batch losses sum to the full-batch loss. The KL term is added only when
    ``beta > 0``. Stats (detached, means over this call's weighted tokens): "kl" (0 when ``ref_logp`` is None),
    "clip_ratio".

    >>> logp = torch.zeros(1, 2, requires_grad=True)
    >>> weights = token_weights(torch.ones(1, 2))
    >>> loss, stats = grpo_loss(logp, logp.detach(), None, torch.tensor([2.0]), weights)
    >>> loss.item(), stats["clip_ratio"].item()
    (-2.0, 0.0)
    """
    if config.beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    mask = weights > 0
    per_token, clipped = clipped_surrogate(
        logp, old_logp, advantages, config.epsilon_low, config.epsilon_high
    )
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else None
    if config.beta > 0:
        per_token = per_token + config.beta * kl
    loss = (per_token * weights).sum()
    stats = {
        "kl": masked_mean(kl.detach(), mask) if kl is not None else logp.new_zeros(()),
        "clip_ratio": masked_mean(clipped, mask),
    }
    return loss, stats
