"""Scoring: the log-probabilities of completion tokens under a policy, with gradients when enabled.

The processor's batch (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ...) is
prompt-major; completions are ``N`` rows, row ``j`` answers prompt ``prompt_index[j]``. The rollout's vision
output (``image_features``) replaces the images, so the encoder runs once per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dip_r1.grpo import token_logprobs
from dip_r1.reuse import VisionInputs, repeat_cache, select_image_features


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


def rope_index(
    model: nn.Module, input_ids: Tensor, mm_token_type_ids: Tensor, image_grid_thw: Tensor
) -> Tensor:
    """``Tensor[3, B, L]`` multimodal positions of unpadded sequences holding several images (their grids in
    order, row after row): the family's own ``get_rope_index``."""
    owner = _rope_owner(model)
    if owner is None:
        raise ValueError("this model has no multimodal rotary positions (get_rope_index): it cannot zoom")
    positions, _ = owner.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw
    )
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


@dataclass
class ZoomColumns:
    """What scoring needs of zoom completions besides their tokens (rows of one micro-batch)."""

    attention: Tensor
    """``Tensor[n, T]`` bool: attended columns (sampled and crop tokens)."""
    positions: Tensor
    """``Tensor[3, n, T]``: the columns' 3-D rope positions, as the rollout computed them."""
    vision: VisionInputs
    """The rollout's images, prompts' and crops'."""
    row_images: list[list[int]]
    """Each row's images in ``vision``, in sequence order (its prompt's first)."""


def _previous_attended(attention: Tensor) -> Tensor:
    """``Tensor[n, T]``: for each completion column, the index into ``[prompt's last, column 0, ...]`` of the
    attended position before it, which predicts its token (columns a completion waited through are skipped).

    >>> _previous_attended(torch.tensor([[True, False, False, True, True]]))
    tensor([[0, 1, 1, 1, 4]])
    """
    t = attention.shape[1]
    index = torch.where(attention, torch.arange(1, t + 1, device=attention.device), 0)
    last = torch.cummax(index, dim=1).values
    return torch.cat([last.new_zeros(len(last), 1), last[:, :-1]], dim=1)


def _zoom_logprobs(
    logits: Tensor, completion_ids: Tensor, zoom: ZoomColumns, temperature: float, with_entropy: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs (and entropies) from ``logits [n, T + 1, V]`` (the prompt's last position, then every column)."""
    prev = _previous_attended(zoom.attention)
    picked = logits.gather(1, prev[..., None].expand(-1, -1, logits.shape[-1]))  # [n, T, V]
    return token_logprobs(picked, completion_ids, temperature, with_entropy=with_entropy)


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
    zoom: ZoomColumns | None = None,
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`completion_logprobs` for whole groups, running each prompt once instead of once per completion.

    ``prompt_index`` holds ``n / group_size`` prompts, each on ``group_size`` contiguous rows. The prompt runs
    forward once (with gradients when enabled) into a KV cache, which is repeated for its rows: the
    repeat's backward sums the rows' gradients into the shared prompt pass, so log-probs and gradients equal
    the per-row path's. The completions then run on that cache at the positions the full sequence would give
    them (the last prompt position + 1 + offset). The first completion token is predicted by the prompt's
    last logit, token ``t + 1`` by completion position ``t``.
    """
    if image_features is not None or zoom is not None:
        inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
    prompts = prompt_index[::group_size]
    prompt = select_prompts(inputs, prompts)
    positions = prompt_positions(model, prompt)  # [3, b, P] or None (plain positions: the model's own)
    extra = {"position_ids": positions} if positions is not None else {}
    if zoom is not None:
        extra.update(zoom.vision.select([images[0] for images in zoom.row_images[::group_size]]))
    elif image_features is not None:
        extra["mm_encoder_outputs"] = select_image_features(image_features, prompts)
    prompt_only = {k: v for k, v in prompt.items() if k not in extra}  # the bank's images replace the batch's
    out = model(**prompt_only, **extra, use_cache=True, logits_to_keep=1)  # once per prompt
    cache = out.past_key_values
    repeat_cache(cache, group_size)  # out of place (repeat_interleave): differentiable
    first = out.logits[:, -1:].repeat_interleave(group_size, dim=0)  # [n, 1, V]

    t = completion_ids.shape[1]
    columns = zoom.attention if zoom is not None else mask
    attention = torch.cat(
        [
            prompt["attention_mask"].repeat_interleave(group_size, dim=0),
            columns.to(prompt["attention_mask"].dtype),
        ],
        dim=1,
    )
    extra = {}
    if zoom is not None:
        extra["position_ids"] = zoom.positions
        extra.update(zoom.vision.select([i for images in zoom.row_images for i in images[1:]]))
    elif positions is not None:
        offsets = torch.arange(1, t + 1, device=positions.device)
        extra["position_ids"] = (positions[:, :, -1:] + offsets).repeat_interleave(group_size, dim=1)
    rest = model(
        input_ids=completion_ids, attention_mask=attention, past_key_values=cache, use_cache=True, **extra
    ).logits  # [n, T, V]
    if zoom is not None:
        return _zoom_logprobs(
            torch.cat([first, rest], dim=1), completion_ids, zoom, temperature, with_entropy
        )
    logits = torch.cat([first, rest[:, :-1]], dim=1)  # [n, T, V]: position t predicts token t + 1
    return token_logprobs(logits, completion_ids, temperature, with_entropy=with_entropy)


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
    zoom: ZoomColumns | None = None,
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities of the completion tokens, ``Tensor[n, T]``, for one micro-batch of ``n`` completions.

    Only the last ``T + 1`` positions' logits are computed (``logits_to_keep``), so ``[n, prompt, vocab]``
    never exists. Gradients flow when the caller enables them. ``image_features`` (``Rollout.image_features``)
    replaces the images: the vision encoder does not run again. With ``share_prefix``, a micro-batch of whole
    groups (several contiguous rows per prompt) runs each prompt once (:func:`shared_prefix_logprobs`),
    except under gradient checkpointing, which cannot keep a KV cache. ``zoom`` (``Rollout.zoom_columns``) scores
    zoom completions: their crop tokens attended at the rollout's positions, their images from its bank.
    ``with_entropy``: also each position's entropy, ``(logp, entropy)`` (:func:`dip_r1.grpo.token_logprobs`, from
    the same logits).
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
            zoom=zoom,
            with_entropy=with_entropy,
        )
    if zoom is not None:
        return _zoom_full_logprobs(
            model, inputs, prompt_index, completion_ids, zoom, temperature, with_entropy
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
    return token_logprobs(logits[:, :-1], completion_ids, temperature, with_entropy=with_entropy)  # [n, T]


def _zoom_full_logprobs(
    model, inputs, prompt_index, completion_ids, zoom: ZoomColumns, temperature, with_entropy: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """The per-row path for zoom completions: prompt and completion in one forward, every image of a row (its
    prompt's, then its crops) from the rollout's bank, the rollout's positions."""
    prompt = select_prompts({k: v for k, v in inputs.items() if k != "pixel_values"}, prompt_index)
    positions = prompt_positions(model, prompt)  # [3, n, P]
    ids = torch.cat([prompt["input_ids"], completion_ids], dim=1)  # [n, P + T]
    attention = torch.cat(
        [prompt["attention_mask"], zoom.attention.to(prompt["attention_mask"].dtype)], dim=1
    )
    t = completion_ids.shape[1]
    logits = model(
        input_ids=ids,
        attention_mask=attention,
        position_ids=torch.cat([positions, zoom.positions], dim=2),
        logits_to_keep=t + 1,
        use_cache=False,
        **zoom.vision.select([i for images in zoom.row_images for i in images]),
    ).logits  # [n, T + 1, V]
    return _zoom_logprobs(logits, completion_ids, zoom, temperature, with_entropy)


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
            zoom=rollout.zoom_columns(mb),
        )
        for mb in micro_batches(len(rollout.prompt_index), micro_batch_size)
    ]
    return torch.cat(parts, dim=0)
