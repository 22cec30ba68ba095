"""Rollouts: sample G completions per prompt, and score completions' tokens under a policy.

The processor's batch (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ...) is
prompt-major; completions are ``B * G`` rows, row ``j`` belongs to prompt ``prompt_index[j]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dip_r1.grpo import completion_mask, token_logprobs


@dataclass
class Rollout:
    """The completions sampled for one batch of prompts."""

    prompt_index: Tensor
    """``Tensor[N]`` long: the prompt each completion answers."""
    completion_ids: Tensor
    """``Tensor[N, T]`` long, padded after the first EOS with the pad id."""
    mask: Tensor
    """``Tensor[N, T]`` bool: completion tokens up to and including the first EOS."""
    truncated: Tensor
    """``Tensor[N]`` bool: no EOS within ``max_new_tokens``."""

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(dim=1)


def select_prompts(inputs: Mapping[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """The processor batch restricted (and repeated) to the prompts in ``index``, images included.

    ``pixel_values`` holds the patches of all images one after the other, ``image_grid_thw[i].prod()``
    rows for image ``i`` (one image per prompt), so it is gathered by row ranges.
    """
    batch = inputs["input_ids"].shape[0]
    out: dict[str, Tensor] = {}
    for key, value in inputs.items():
        if key == "pixel_values" and "image_grid_thw" in inputs:
            sizes = inputs["image_grid_thw"].prod(dim=-1)
            starts = torch.cumsum(sizes, 0) - sizes
            rows = torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in index.tolist()])
            out[key] = value[rows.to(value.device)]
        elif isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
            out[key] = value[index.to(value.device)]
        else:
            out[key] = value
    return out


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    *,
    group_size: int,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    min_new_tokens: int = 0,
    suppress_token_ids: list[int] | None = None,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt, each stopping at its EOS.

    ``suppress_token_ids`` are never sampled: image placeholders in a completion would no longer match the
    image features when the completion is scored.
    """
    batch = inputs["input_ids"].shape[0]
    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(
        **inputs,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        num_return_sequences=group_size,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        suppress_tokens=suppress_token_ids or None,
    )
    ids = out[:, prompt_len:]
    mask, truncated = completion_mask(ids, eos_token_id, pad_token_id)
    ids = ids.masked_fill(~mask, pad_token_id)
    index = torch.arange(batch, device=ids.device).repeat_interleave(group_size)
    return Rollout(prompt_index=index, completion_ids=ids, mask=mask, truncated=truncated)


def completion_logprobs(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    prompt_index: Tensor,
    completion_ids: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Log-probabilities of the completion tokens, ``Tensor[n, T]``, for one micro-batch of ``n`` completions.

    Only the last ``T + 1`` positions' logits are computed (``logits_to_keep``), so ``[n, prompt, vocab]``
    never exists. Gradients flow when the caller enables them.
    """
    prompt = select_prompts(inputs, prompt_index)
    ids = torch.cat([prompt["input_ids"], completion_ids], dim=1)  # [n, P + T]
    attention = torch.cat([prompt["attention_mask"], mask.to(prompt["attention_mask"].dtype)], dim=1)
    extra = {k: v for k, v in prompt.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in prompt:
        extra["mm_token_type_ids"] = torch.cat(
            [prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1
        )
    t = completion_ids.shape[1]
    logits = model(
        input_ids=ids, attention_mask=attention, logits_to_keep=t + 1, use_cache=False, **extra
    ).logits
    return token_logprobs(logits[:, :-1], completion_ids, temperature)  # [n, T]


def micro_batches(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` rows covering ``range(n)``.

    >>> micro_batches(5, 2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def all_logprobs(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    rollout: Rollout,
    *,
    micro_batch_size: int,
    temperature: float = 1.0,
) -> Tensor:
    """``completion_logprobs`` for every completion, micro-batch by micro-batch, without gradients."""
    parts = [
        completion_logprobs(
            model,
            inputs,
            rollout.prompt_index[mb],
            rollout.completion_ids[mb],
            rollout.mask[mb],
            temperature=temperature,
        )
        for mb in micro_batches(len(rollout.prompt_index), micro_batch_size)
    ]
    return torch.cat(parts, dim=0)
