"""Rollouts: sample G completions per prompt, and score completions' tokens under a policy.

The processor's batch (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ...) is
prompt-major; completions are ``B * G`` rows, row ``j`` belongs to prompt ``prompt_index[j]``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dip_r1.decoding import merged_lora, preallocated_cache
from dip_r1.grpo import completion_mask, token_logprobs
from dip_r1.reuse import encode_images, fallback_once, repeat_cache, select_image_features


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
    image_features: object | None = None
    """The vision encoder's output for the prompts (:func:`encode_images`), reused when completions are
    scored; None where it cannot be reused."""

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


def _rope_owner(model: nn.Module) -> nn.Module | None:
    """The submodule that computes multimodal rotary positions (Qwen-VL's ``get_rope_index``), if any."""
    return next((m for m in model.modules() if hasattr(m, "get_rope_index")), None)


def _prompt_positions(model: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor | None:
    """``Tensor[3, B, P]`` multimodal positions of the prompts, or None for a model with plain positions."""
    owner = _rope_owner(model)
    if owner is None:
        return None
    keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask", "mm_token_type_ids")
    positions, _ = owner.get_rope_index(inputs["input_ids"], **{k: inputs[k] for k in keys if k in inputs})
    return positions


def _sample(logits: Tensor, temperature: float, top_p: float, do_sample: bool) -> Tensor:
    """One token per row of ``logits [N, V]``: greedy, or from softmax(logits / temperature) cut at top_p."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # always keeps the most likely token
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1).squeeze(-1)


def _all_done(done: Tensor) -> bool:
    """Whether every row is finished, on every rank: under FSDP each decoding step gathers weights across
    ranks, so a rank that stopped early would leave the others waiting forever."""
    finished = done.all()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        finished = finished.to(torch.int32)
        torch.distributed.all_reduce(finished, op=torch.distributed.ReduceOp.MIN)
    return bool(finished)


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
    preallocate: bool = True,
    merge_lora: bool = True,
    compile_decode: bool = False,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt, each stopping at its EOS.

    The vision encoder and the prompt prefill run once per prompt; the prompt's KV cache is then repeated
    for its G samples (HF ``generate`` with ``num_return_sequences`` prefills every copy). Prompts are
    left-padded, so every row's next token goes at the same column. ``suppress_token_ids`` are never
    sampled: an image placeholder in a completion would no longer match the image features when the
    completion is scored.

    The decoding loop allocates no cache: with ``preallocate`` the KV cache, the attention mask, the positions
    and the tokens are buffers of the rollout's full length, written in place (caches it cannot hold, such as
    linear-attention states, keep HF's dynamic cache, the reason logged once); they are freed when the rollout
    returns. ``merge_lora`` runs the rollout on LoRA merged into copies of the base weights where exact
    (:func:`dip_r1.decoding.merged_lora`; the weights after are the tensors of before). ``compile_decode`` runs
    the decoding forwards through ``torch.compile`` (compiled once per model; pays off on GPUs).
    """
    batch, prompt_len = inputs["input_ids"].shape
    device = inputs["input_ids"].device
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    with merged_lora(model, batch * group_size * max_new_tokens) if merge_lora else contextlib.nullcontext():
        positions = _prompt_positions(model, inputs)  # [3, B, P] or None
        extra = {"position_ids": positions} if positions is not None else {}
        features = encode_images(model, inputs)  # vision, once per prompt
        prompts = dict(inputs)
        if features is not None:
            del prompts["pixel_values"]
            extra["mm_encoder_outputs"] = {"image": features}
        out = model(**prompts, **extra, use_cache=True, logits_to_keep=1)  # prefill, once per prompt
        total = prompt_len + max_new_tokens
        cache, reason = (
            preallocated_cache(out.past_key_values, group_size, total) if preallocate else (None, None)
        )
        if cache is None:
            if reason is not None:
                fallback_once(f"rollouts keep the dynamic KV cache: {reason}")
            cache = out.past_key_values
            repeat_cache(cache, group_size)
        logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)  # [N, V]
        del out

        n = batch * group_size
        # Buffers of the whole rollout, sliced per token: the mask of a finished row stays 1 (its pad tokens are
        # attended by nobody that matters), as HF generate's does.
        attention = inputs["attention_mask"].new_ones(n, total)  # [N, P + T]
        attention[:, :prompt_len] = inputs["attention_mask"].repeat_interleave(group_size, dim=0)
        if positions is not None:
            start = positions[:, :, -1:].repeat_interleave(group_size, dim=1) + 1  # [3, N, 1]
        else:
            start = attention[:, :prompt_len].long().sum(dim=1, keepdim=True)  # [N, 1]
        steps = start + torch.arange(max_new_tokens, device=device)  # [3, N, T] or [N, T]
        bias = torch.zeros(logits.shape[-1], device=device)  # [V]: -inf on tokens never sampled
        if suppress_token_ids:
            bias[suppress_token_ids] = float("-inf")
        bias_early = bias.clone()  # before min_new_tokens, EOS too
        bias_early[eos[eos < len(bias)]] = float("-inf")  # an EOS outside the vocabulary is never sampled
        forward = _compiled(model) if compile_decode else model

        tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            logits = logits.float() + (bias_early if t < min_new_tokens else bias)  # [N, V]
            token = _sample(logits, temperature, top_p, do_sample).masked_fill_(done, pad_token_id)  # [N]
            tokens[:, t] = token
            done |= torch.isin(token, eos)
            if _all_done(done) or t == max_new_tokens - 1:
                break
            out = forward(
                input_ids=tokens[:, t : t + 1],
                attention_mask=attention[:, : prompt_len + t + 1],
                position_ids=steps[..., t : t + 1],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1]
        cache = out = None  # the rollout's cache goes now, not at the next one

    mask, truncated = completion_mask(tokens, eos_token_id, pad_token_id)
    ids = tokens.masked_fill(~mask, pad_token_id)
    keep = int(mask.sum(dim=1).max().clamp(min=1))  # drop columns that are padding in every row
    index = torch.arange(batch, device=device).repeat_interleave(group_size)
    return Rollout(
        prompt_index=index,
        completion_ids=ids[:, :keep],
        mask=mask[:, :keep],
        truncated=truncated,
        image_features=features,
    )


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled(model: nn.Module):
    """``torch.compile`` of the model's forward for decoding, built once per model (shapes marked dynamic: the
    cache grows by one position a token)."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=True)
    return _COMPILED[model]


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
    positions = _prompt_positions(model, prompt)  # [3, b, P] or None (plain positions: the model's own)
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
    rollout: Rollout,
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
