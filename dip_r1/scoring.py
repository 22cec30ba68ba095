"""Scoring: the log-probabilities of completion tokens under a policy, with gradients when enabled.

The processor's batch (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ...) is
prompt-major; completions are ``N`` rows, row ``j`` answers prompt ``prompt_index[j]``. The rollout's vision
output (``image_features``) replaces the images, so the encoder runs once per step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from dip_r1.grpo import token_logprobs
from dip_r1.reuse import repeat_cache, select_image_features


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


def _rope_owner(model: nn.Module) -> nn.Module | None:
    """The submodule that computes multimodal rotary positions (Qwen-VL's ``get_rope_index``), if any."""
    return next((m for m in model.modules() if hasattr(m, "get_rope_index")), None)


def prompt_positions(model: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor | None:
    """``Tensor[3, B, P]`` multimodal positions of the prompts, or None for a model with plain positions."""
    owner = _rope_owner(model)
    if owner is None:
        return None
    keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask", "mm_token_type_ids")
    positions, _ = owner.get_rope_index(inputs["input_ids"], **{k: inputs[k] for k in keys if k in inputs})
    return positions


def _group_size(prompt_index: Tensor) -> int | None:
    """``g`` when ``prompt_index`` is whole groups, each prompt's ``g`` rows contiguous and no prompt in two
    runs; else None.

    >>> [_group_size(torch.tensor(i)) for i in ([0, 0, 1, 1], [0, 0, 1], [0, 1, 0, 1], [4, 4, 4])]
    [2, None, None, 3]
    """
    runs, counts = torch.unique_consecutive(prompt_index, return_counts=True)
    if len(runs) != len(torch.unique(runs)) or not bool((counts == counts[0]).all()):
        return None
    return int(counts[0])


def _checkpointing(model: nn.Module) -> bool:
    """Whether a layer recomputes activations in the backward (gradient checkpointing in training mode): HF
    then drops the KV cache inside the layer, so a prompt's cache cannot be shared."""
    return any(getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules())


def shared_prefix_logprobs(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    prompt_index: Tensor,
    completion_ids: Tensor,
    mask: Tensor,
    *,
    group_size: int,
    temperature: float = 1.0,
    image_features=None,
) -> Tensor:
    """:func:`completion_logprobs` for whole groups, running each prompt once instead of once per completion.

    ``prompt_index`` holds ``n / group_size`` prompts, each on ``group_size`` contiguous rows. The prompt runs
    forward once (with gradients when enabled) into a KV cache, which is repeated for its rows: the
    repeat's backward sums the rows' gradients into the shared prompt pass, so log-probs and gradients equal
    the per-row path's. The completions then run on that cache at the positions the full sequence would give
    them (the last prompt position + 1 + offset). The first completion token is predicted by the prompt's
    last logit, token ``t + 1`` by completion position ``t``.
    """
    if image_features is not None:
        inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
    prompts = prompt_index[::group_size]
    prompt = select_prompts(inputs, prompts)
    positions = prompt_positions(model, prompt)  # [3, b, P] or None (plain positions: the model's own)
    extra = {"position_ids": positions} if positions is not None else {}
    if image_features is not None:
        extra["mm_encoder_outputs"] = select_image_features(image_features, prompts)
    out = model(**prompt, **extra, use_cache=True, logits_to_keep=1)  # once per prompt
    cache = out.past_key_values
    repeat_cache(cache, group_size)  # out of place (repeat_interleave): differentiable
    first = out.logits[:, -1:].repeat_interleave(group_size, dim=0)  # [n, 1, V]

    t = completion_ids.shape[1]
    attention = torch.cat(
        [
            prompt["attention_mask"].repeat_interleave(group_size, dim=0),
            mask.to(prompt["attention_mask"].dtype),
        ],
        dim=1,
    )
    extra = {}
    if positions is not None:
        offsets = torch.arange(1, t + 1, device=positions.device)
        extra["position_ids"] = (positions[:, :, -1:] + offsets).repeat_interleave(group_size, dim=1)
    rest = model(
        input_ids=completion_ids, attention_mask=attention, past_key_values=cache, use_cache=True, **extra
    ).logits  # [n, T, V]
    logits = torch.cat([first, rest[:, :-1]], dim=1)  # [n, T, V]: position t predicts token t + 1
    return token_logprobs(logits, completion_ids, temperature)


def completion_logprobs(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    prompt_index: Tensor,
    completion_ids: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    image_features=None,
    share_prefix: bool = True,
) -> Tensor:
    """Log-probabilities of the completion tokens, ``Tensor[n, T]``, for one micro-batch of ``n`` completions.

    Only the last ``T + 1`` positions' logits are computed (``logits_to_keep``), so ``[n, prompt, vocab]``
    never exists. Gradients flow when the caller enables them. ``image_features`` (``Rollout.image_features``)
    replaces the images: the vision encoder does not run again. With ``share_prefix``, a micro-batch of whole
    groups (several contiguous rows per prompt) runs each prompt once (:func:`shared_prefix_logprobs`),
    except under gradient checkpointing, which cannot keep a KV cache.
    """
    group = _group_size(prompt_index) if share_prefix else None
    if group is not None and group > 1 and not _checkpointing(model):
        return shared_prefix_logprobs(
            model,
            inputs,
            prompt_index,
            completion_ids,
            mask,
            group_size=group,
            temperature=temperature,
            image_features=image_features,
        )
    if image_features is not None:
        inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
    prompt = select_prompts(inputs, prompt_index)
    ids = torch.cat([prompt["input_ids"], completion_ids], dim=1)  # [n, P + T]
    attention = torch.cat([prompt["attention_mask"], mask.to(prompt["attention_mask"].dtype)], dim=1)
    extra = {k: v for k, v in prompt.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in prompt:
        extra["mm_token_type_ids"] = torch.cat(
            [prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1
        )
    if image_features is not None:
        extra["mm_encoder_outputs"] = select_image_features(image_features, prompt_index)
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
    rollout,
    *,
    micro_batch_size: int,
    temperature: float = 1.0,
    share_prefix: bool = True,
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
            image_features=rollout.image_features,
            share_prefix=share_prefix,
        )
        for mb in micro_batches(len(rollout.prompt_index), micro_batch_size)
    ]
    return torch.cat(parts, dim=0)
