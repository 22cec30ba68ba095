"""Per-token log-probabilities (and entropies) of given labels from a policy's logits, memory-light.

The logits of a batch of completions are ``[N, T, V]`` with a vocabulary ``V`` of 150k-250k for the
Qwen-VL families: a float32 ``log_softmax`` of them, saved for the backward, is the largest tensor of a
GRPO step. :func:`token_logprobs` never builds it (chunks over ``N``, a backward that recomputes the
softmax), and computes the entropies that ``top_entropy_quantile`` and ``train/entropy`` need from the
same chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 24  # logits elements handled at once: 64 MB of float32 temporaries


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(logits / t)[label] with a chunked backward that saves no ``[N, T, V]`` copy; optionally
    also the entropy of softmax(logits / t), a constant (no gradient), from the same chunks."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float, with_entropy: bool):
        n, t, v = logits.shape
        rows = max(1, _CHUNK_ELEMENTS // max(1, t * v))
        out = torch.empty(n, t, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        entropy = torch.empty_like(out) if with_entropy else out.new_empty(0)
        for i in range(0, n, rows):
            chunk = logits[i : i + rows].float() / temperature  # [n', T, V], float32 for accuracy
            lse[i : i + rows] = chunk.logsumexp(dim=-1)
            picked = chunk.gather(-1, labels[i : i + rows, :, None]).squeeze(-1)  # [n', T]
            out[i : i + rows] = picked - lse[i : i + rows]
            if with_entropy:  # -sum p log p, with log p = z - lse (as TRL's entropy_from_logits)
                logps = chunk.sub_(lse[i : i + rows, :, None])
                entropy[i : i + rows] = -(logps.exp() * logps).sum(dim=-1)
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_entropy: Tensor | None = None):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ctx.rows):
            sl = slice(i, i + ctx.rows)
            g = grad_out[sl, :, None].float()  # [n', T, 1]
            # d logp / d z_v = (1[v == label] - softmax_v) / temperature
            probs = torch.exp(logits[sl].float() / ctx.temperature - lse[sl, :, None])  # [n', T, V]
            probs.mul_(-g).scatter_add_(-1, labels[sl, :, None], g)
            grad[sl] = probs.div_(ctx.temperature)
        return grad, None, None, None


def token_logprobs(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, *, with_entropy: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-prob of each label under ``softmax(logits / temperature)``, ``Tensor[N, T]`` float32.

    ``logits``: ``Tensor[N, T, V]`` (any float dtype; computed in float32), ``labels``:
    ``Tensor[N, T]`` of valid token ids (put e.g. the pad id at masked positions, not -100).
    Memory-light: works in chunks over ``N`` (logsumexp and gather, no full ``log_softmax``), and
    the backward recomputes the softmax chunk by chunk instead of saving a float32 copy.
    ``with_entropy``: also return each position's entropy (nats) of that softmax, ``Tensor[N, T]`` without
    gradient, from the same chunks (one more exp over the logits, no second read of them).

    >>> logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))  # [1, 2, 3]
    >>> token_logprobs(logits, torch.tensor([[0, 2]])).exp()
    tensor([[0.5000, 0.8000]])
    >>> token_logprobs(logits, torch.tensor([[0, 2]]), with_entropy=True)[1]  # 1.5 ln 2; 0.2 ln 10 + 0.8 ln 1.25
    tensor([[1.0397, 0.6390]])
    """
    logp, entropy = _TokenLogProbs.apply(logits, labels, float(temperature), with_entropy)
    return (logp, entropy) if with_entropy else logp
