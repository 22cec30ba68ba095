"""Rollouts: sample G completions per prompt (:func:`sample_completions`), and what a step keeps of them.

The processor's batch (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ...) is
prompt-major; completions are ``B * G`` rows, row ``j`` belongs to prompt ``prompt_index[j]``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor, nn

from dip_r1.config import SamplingConfig
from dip_r1.decoding import merged_lora, preallocated_cache
from dip_r1.grpo import completion_mask
from dip_r1.reuse import encode_images, fallback_once, repeat_cache
from dip_r1.rewards.parsing import ParsedCompletion
from dip_r1.scoring import prompt_positions
from dip_r1.tokens import TokenIds
from dip_r1.zoom.geometry import CropGeometry


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
    crops: list[list[CropGeometry]] | None = None
    """Zoom: the crops inserted into each completion, in order (``"region": k`` names the ``k``-th); None in
    text mode."""

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(dim=1)


@dataclass
class RolloutRecord:
    """What one training step sampled and scored, kept for the callbacks (references, no copies)."""

    step: int
    """``trainer.global_step`` before the step."""
    group_size: int
    """G: completion ``j`` answers prompt ``j // G``."""
    texts: list[str]
    """The ``B * G`` completions."""
    parsed: list[ParsedCompletion]
    """Each completion, parsed (boxes in model coordinates)."""
    scores: dict[str, Tensor]
    """``"total"`` and each reward, ``Tensor[B * G]`` on the CPU."""
    targets: list[dict]
    """One target per prompt."""
    images: list[Image.Image] | None = field(default=None)
    """One (resized) image per prompt, when the batch carried them."""
    rollout: Rollout | None = field(default=None)
    """The sampled tokens themselves."""
    sources: list[Image.Image] | None = field(default=None)
    """One source image per prompt (the decoded dataset image) when the batch carried them (zoom)."""

    @property
    def crops(self) -> list[list[CropGeometry]]:
        """The crops each completion was shown (zoom); empty lists in text mode."""
        crops = self.rollout.crops if self.rollout is not None else None
        return crops if crops is not None else [[] for _ in self.texts]


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
    sampling: SamplingConfig,
    tokens: TokenIds,
    *,
    group_size: int = 1,
    preallocate: bool = True,
    merge_lora: bool = True,
    compile_decode: bool = False,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt as ``sampling`` says, each stopping at an EOS of
    ``tokens``; ``tokens.never_sampled`` are never sampled.

    The vision encoder and the prompt prefill run once per prompt; the prompt's KV cache is then repeated
    for its G samples (HF ``generate`` with ``num_return_sequences`` prefills every copy). Prompts are
    left-padded, so every row's next token goes at the same column.

    The decoding loop allocates no cache: with ``preallocate`` the KV cache, the attention mask, the positions
    and the tokens are buffers of the rollout's full length, written in place (caches it cannot hold, such as
    linear-attention states, keep HF's dynamic cache, the reason logged once); they are freed when the rollout
    returns. ``merge_lora`` runs the rollout on LoRA merged into copies of the base weights where exact
    (:func:`dip_r1.decoding.merged_lora`; the weights after are the tensors of before). ``compile_decode`` runs
    the decoding forwards through ``torch.compile`` (compiled once per model; pays off on GPUs).
    """
    max_new_tokens, min_new_tokens = sampling.max_new_tokens, sampling.min_new_tokens
    temperature, top_p, do_sample = sampling.temperature, sampling.top_p, sampling.do_sample
    eos_token_id, pad_token_id, suppress_token_ids = list(tokens.eos), tokens.pad, list(tokens.never_sampled)
    batch, prompt_len = inputs["input_ids"].shape
    device = inputs["input_ids"].device
    eos = torch.tensor(eos_token_id, device=device)
    with merged_lora(model, batch * group_size * max_new_tokens) if merge_lora else contextlib.nullcontext():
        positions = prompt_positions(model, inputs)  # [3, B, P] or None
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

        sampled = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            logits = logits.float() + (bias_early if t < min_new_tokens else bias)  # [N, V]
            token = _sample(logits, temperature, top_p, do_sample).masked_fill_(done, pad_token_id)  # [N]
            sampled[:, t] = token
            done |= torch.isin(token, eos)
            if _all_done(done) or t == max_new_tokens - 1:
                break
            out = forward(
                input_ids=sampled[:, t : t + 1],
                attention_mask=attention[:, : prompt_len + t + 1],
                position_ids=steps[..., t : t + 1],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1]
        cache = out = None  # the rollout's cache goes now, not at the next one

    mask, truncated = completion_mask(sampled, eos_token_id, pad_token_id)
    ids = sampled.masked_fill(~mask, pad_token_id)
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
