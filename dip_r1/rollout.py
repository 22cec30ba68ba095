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
from dip_r1.reuse import VisionInputs, encode_images, fallback_once, repeat_cache
from dip_r1.rewards.parsing import ParsedCompletion
from dip_r1.scoring import ZoomColumns, prompt_positions
from dip_r1.tokens import TokenIds
from dip_r1.zoom.crops import Zoom
from dip_r1.zoom.geometry import CropGeometry
from dip_r1.zoom.insert import CropBlock, crop_block


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
    attention: Tensor | None = None
    """Zoom: ``Tensor[N, T]`` bool, the columns attended: sampled tokens and crop tokens (the columns a
    completion waited through are not); None in text mode, where it is :attr:`mask`."""
    positions: Tensor | None = None
    """Zoom: ``Tensor[3, N, T]`` the 3-D rope positions of the completion columns."""
    vision: VisionInputs | None = None
    """Zoom: the images of the rollout, the prompts' (index ``p`` for prompt ``p``) then the crops'."""
    row_images: list[list[int]] | None = None
    """Zoom: each completion's images in ``vision``, in sequence order (its prompt's, then its crops)."""
    logprobs: Tensor | None = None
    """With ``keep_logprobs``, ``Tensor[N, T]``: each sampled token's log-probability when it was sampled
    (temperature applied, tokens never sampled not removed: what the scoring passes compute), 0 elsewhere."""

    @property
    def lengths(self) -> Tensor:
        """Sampled tokens per completion (crop tokens are not sampled)."""
        return self.mask.sum(dim=1)

    def zoom_columns(self, rows: slice) -> ZoomColumns | None:
        """What scoring needs of these rows besides their tokens (zoom), or None (text)."""
        if self.attention is None:
            return None
        return ZoomColumns(self.attention[rows], self.positions[:, rows], self.vision, self.row_images[rows])

    @property
    def crops_per_completion(self) -> Tensor:
        """``Tensor[N]``: crops shown to each completion (0 in text mode)."""
        return torch.tensor([len(c) for c in self.crops] if self.crops is not None else [0] * len(self.mask))


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


def _next_tokens(logits: Tensor, sampling: SamplingConfig, count: Tensor) -> Tensor:
    """One token per row of ``logits [N, V]`` (``count``: tokens each row has sampled; tests force prefixes by
    replacing this function)."""
    return _sample(logits, sampling.temperature, sampling.top_p, sampling.do_sample)


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
    zoom: Zoom | None = None,
    keep_logprobs: bool = False,
    preallocate: bool = True,
    merge_lora: bool = True,
    compile_decode: bool = False,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt as ``sampling`` says, each stopping at an EOS of
    ``tokens``; ``tokens.never_sampled`` are never sampled.

    The vision encoder and the prompt prefill run once per prompt; the prompt's KV cache is then repeated
    for its G samples (HF ``generate`` with ``num_return_sequences`` prefills every copy). Prompts are
    left-padded, so every row's next token goes at the same column.

    With ``sampling.look_mode == "zoom"`` (``zoom`` then holds the batch's source images), a completion that
    closes ``</look>`` waits; once none is still writing its look, each waiting one is shown its crops
    (:mod:`dip_r1.zoom.insert`: the crops encoded once, their tokens and 3-D positions appended) and goes on
    to its answer. ``max_new_tokens`` counts sampled tokens only. ``keep_logprobs`` keeps each sampled token's
    log-probability as it was sampled (``Rollout.logprobs``: what the scoring passes must reproduce).

    The decoding loop allocates no cache: with ``preallocate`` the KV cache, the attention mask, the positions
    and the tokens are buffers of the rollout's full length, written in place (caches it cannot hold, such as
    linear-attention states, keep HF's dynamic cache, the reason logged once); they are freed when the rollout
    returns. ``merge_lora`` runs the rollout on LoRA merged into copies of the base weights where exact
    (:func:`dip_r1.decoding.merged_lora`; the weights after are the tensors of before). ``compile_decode`` runs
    the decoding forwards through ``torch.compile`` (compiled once per model; pays off on GPUs).
    """
    zooming = sampling.look_mode == "zoom"
    if zooming and zoom is None:
        raise ValueError("look_mode 'zoom' needs the batch's source images (a Zoom)")
    max_new, temperature = sampling.max_new_tokens, sampling.temperature
    batch, prompt_len = inputs["input_ids"].shape
    device = inputs["input_ids"].device
    n = batch * group_size
    eos = torch.tensor(list(tokens.eos), device=device)
    # columns: every row samples at most max_new tokens; zoom adds the waiting columns and one crop block
    columns = max_new if not zooming else 2 * max_new + zoom.max_block_tokens()
    with merged_lora(model, n * max_new) if merge_lora else contextlib.nullcontext():
        positions = prompt_positions(model, inputs)  # [3, B, P] or None
        extra = {"position_ids": positions} if positions is not None else {}
        features = encode_images(model, inputs)  # vision, once per prompt
        prompts = dict(inputs)
        if features is not None:
            del prompts["pixel_values"]
            extra["mm_encoder_outputs"] = {"image": features}
        out = model(**prompts, **extra, use_cache=True, logits_to_keep=1)  # prefill, once per prompt
        total = prompt_len + columns
        cache, reason = (
            preallocated_cache(out.past_key_values, group_size, total) if preallocate else (None, None)
        )
        if cache is None:
            if reason is not None:
                fallback_once(f"rollouts keep the dynamic KV cache: {reason}")
            cache = out.past_key_values
            repeat_cache(cache, group_size)
        logits = (
            out.logits[:, -1].repeat_interleave(group_size, dim=0).float()
        )  # [N, V]: each row's next token
        del out

        # Buffers of the whole rollout, written column by column.
        attention = inputs["attention_mask"].new_zeros(n, total)  # [N, P + C]
        attention[:, :prompt_len] = inputs["attention_mask"].repeat_interleave(group_size, dim=0)
        if positions is not None:
            next_pos = positions[:, :, -1].repeat_interleave(group_size, dim=1) + 1  # [3, N]
        else:
            next_pos = attention[:, :prompt_len].long().sum(dim=1)  # [N]
        place = torch.zeros(
            (*next_pos.shape, columns), dtype=torch.long, device=device
        )  # [3, N, C] or [N, C]
        bias = torch.zeros(logits.shape[-1], device=device)  # [V]: -inf on tokens never sampled
        bias[list(tokens.never_sampled)] = float("-inf")
        early = bias.clone()  # before min_new_tokens, EOS too
        early[eos[eos < len(bias)]] = float("-inf")  # an EOS outside the vocabulary is never sampled
        forward = _compiled(model) if compile_decode else model

        ids = torch.full((n, columns), tokens.pad, dtype=torch.long, device=device)
        sampled = torch.zeros((n, columns), dtype=torch.bool, device=device)  # columns a row sampled
        chosen = torch.zeros((n, columns), device=device)  # the log-prob of each sampled token
        count = torch.zeros(n, dtype=torch.long, device=device)  # tokens sampled per row
        done = torch.zeros(n, dtype=torch.bool, device=device)
        hit_eos = torch.zeros(n, dtype=torch.bool, device=device)
        waiting = torch.zeros(n, dtype=torch.bool, device=device)  # zoom: closed </look>, crops not shown yet
        zoomed = torch.zeros(n, dtype=torch.bool, device=device)
        blocks = []
        col = used = 0
        while col < columns:
            active = ~done & ~waiting
            if _all_done(~active):
                # every rank takes the crop step when any rank has a waiting row, or they would part ways
                if not (zooming and not _all_done(~waiting)):
                    break
                block = _show_crops(model, zoom, inputs, ids, sampled, waiting, group_size, col, tokens)
                width = block.ids.shape[1]
                ids[:, col : col + width] = block.ids
                attention[:, prompt_len + col : prompt_len + col + width] = block.attention
                place[..., col : col + width] = block.positions
                shown = torch.zeros_like(waiting)
                shown[list(block.images)] = True
                if width:
                    out = forward(
                        input_ids=block.ids,
                        attention_mask=attention[:, : prompt_len + col + width],
                        position_ids=block.positions,
                        past_key_values=cache,
                        use_cache=True,
                        logits_to_keep=1,
                        **(block.vision.select(_block_order(block)) if block.vision is not None else {}),
                    )
                    logits = torch.where(shown[:, None], out.logits[:, -1].float(), logits)
                    next_pos = torch.where(shown, block.positions[..., -1] + 1, next_pos)
                blocks.append(block)
                col += width
                used = col
                zoomed |= waiting
                waiting[:] = False
                continue
            biased = logits + torch.where((count < sampling.min_new_tokens)[:, None], early, bias)
            token = _next_tokens(biased, sampling, count).masked_fill_(~active, tokens.pad)
            ids[:, col] = token
            if keep_logprobs:
                chosen[:, col] = (
                    torch.log_softmax(logits / temperature, dim=-1).gather(1, token[:, None]).squeeze(1)
                )
            sampled[:, col] = active
            attention[:, prompt_len + col] = active
            place[..., col] = next_pos
            next_pos = next_pos + active
            count += active
            used = col + 1
            hit_eos |= active & torch.isin(token, eos)
            done |= hit_eos | (count >= max_new)
            if zooming:
                waiting |= _closed_look(zoom, ids, sampled, active & ~done & ~zoomed, col)
            if _all_done(done):
                break
            out = forward(
                input_ids=ids[:, col : col + 1],
                attention_mask=attention[:, : prompt_len + col + 1],
                position_ids=place[..., col : col + 1],
                past_key_values=cache,
                use_cache=True,
            )
            logits = torch.where(active[:, None], out.logits[:, -1].float(), logits)
            col += 1
        cache = out = None  # the rollout's cache goes now, not at the next one

    index = torch.arange(batch, device=device).repeat_interleave(group_size)
    keep = max(used, 1)
    mask = sampled[:, :keep]
    rollout = Rollout(
        index, ids[:, :keep].masked_fill(~mask, tokens.pad), mask, ~hit_eos, image_features=features
    )
    if keep_logprobs:
        rollout.logprobs = chosen[:, :keep].masked_fill(~mask, 0.0)
    if zooming:
        completion_attention = attention[:, prompt_len : prompt_len + keep].bool()
        rollout = _with_crops(
            rollout, ids[:, :keep], completion_attention, place[..., :keep], blocks, inputs, tokens.pad
        )
    return rollout


def _closed_look(zoom: Zoom, ids: Tensor, sampled: Tensor, rows: Tensor, col: int) -> Tensor:
    """``Tensor[N]`` bool: the ``rows`` whose token at ``col`` closed ``</look>`` (checked on the last 8
    sampled tokens, and only when that token spells a ``>``)."""
    out = torch.zeros_like(rows)
    for row in rows.nonzero().flatten().tolist():
        if not zoom.spells_gt(int(ids[row, col])):
            continue
        recent = ids[row, : col + 1][sampled[row, : col + 1]][-8:]
        out[row] = zoom.closed_look(recent.tolist())
    return out


def _show_crops(model, zoom: Zoom, inputs, ids, sampled, waiting, group_size, col, tokens) -> CropBlock:
    """The crop block of the waiting rows (:func:`dip_r1.zoom.insert.crop_block`)."""
    rows = waiting.nonzero().flatten().tolist()
    prompt_of = [r // group_size for r in range(len(waiting))]
    types = inputs.get("mm_token_type_ids")
    completions, sequences, mm_types = [], [], []
    for row in rows:
        p = prompt_of[row]
        keep_prompt = inputs["attention_mask"][p].bool()
        done_cols = sampled[row, :col]
        completion = ids[row, :col][done_cols]
        completions.append(completion)
        sequences.append(torch.cat([inputs["input_ids"][p][keep_prompt], completion]))
        prompt_types = (
            types[p][keep_prompt]
            if types is not None
            else torch.zeros_like(keep_prompt, dtype=torch.long)[keep_prompt]
        )
        mm_types.append(torch.cat([prompt_types, torch.zeros_like(completion)]))
    return crop_block(
        model,
        zoom,
        rows,
        prompt_of,
        completions,
        sequences,
        mm_types,
        inputs["image_grid_thw"],
        len(waiting),
        tokens.pad,
        ids.device,
    )


def _block_order(block: CropBlock) -> list[int]:
    """The block's crop images in row order (the order the model scatters image features into its tokens)."""
    return [i for row in sorted(block.images) for i in block.images[row]]


def _with_crops(rollout: Rollout, ids, attention, positions, blocks, inputs, pad: int) -> Rollout:
    """The zoom rollout: the crop tokens kept in the completion (attended, outside the loss), the completions'
    3-D positions, and one bank of the prompts' and crops' images with each completion's images in order."""
    rollout.completion_ids = ids.masked_fill(~(rollout.mask | attention), pad)
    rollout.attention = attention
    rollout.positions = positions
    prompts = VisionInputs(inputs["pixel_values"], inputs["image_grid_thw"], rollout.image_features)
    n = len(rollout.prompt_index)
    row_images = [[int(p)] for p in rollout.prompt_index.tolist()]
    crops: list[list[CropGeometry]] = [[] for _ in range(n)]
    vision = prompts
    for block in blocks:
        for row, shown in block.crops.items():
            crops[row] = shown
        if block.vision is None:
            continue
        offset = len(vision)
        vision = vision.extend(block.vision)
        for row, images in block.images.items():
            row_images[row] += [offset + i for i in images]
    rollout.vision, rollout.row_images, rollout.crops = vision, row_images, crops
    return rollout


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled(model: nn.Module):
    """``torch.compile`` of the model's forward for decoding, built once per model (shapes marked dynamic: the
    cache grows by one position a token)."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=True)
    return _COMPILED[model]
