"""Crops into a rollout's sequences: the token block each paused completion gets, and its 3-D positions.

The rollout decodes every completion at the same column. Completions that closed ``</look>`` wait (their
columns are masked padding) until none is still writing its look; then one block of columns is appended to
all of them at once: each waiting completion's crops (vision start, image pads, vision end per crop) at the
right end of the block, masked padding before them, a fully masked block for the others. Masked columns are
attended by nobody, so a completion reads ``... </look> [crop 1] [crop 2] <answer> ...`` exactly as if written
without gaps, and the scoring passes see the very same columns. (Except in a family with linear-attention
layers, Qwen3.5: HF zeroes their masked inputs but their state still decays through those columns, so a row
that waited differs slightly from its unpadded sequence; the scoring passes see the same columns, so the rollout
and the loss still agree.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dip_r1.reuse import VisionInputs
from dip_r1.scoring import rope_index
from dip_r1.zoom.crops import Zoom
from dip_r1.zoom.geometry import CropGeometry


@dataclass
class CropBlock:
    """The columns appended to every completion when the waiting ones are shown their crops."""

    ids: Tensor
    """``Tensor[N, L]`` long: the crops' tokens right-aligned, the pad id elsewhere."""
    attention: Tensor
    """``Tensor[N, L]`` bool: the crops' tokens."""
    image_tokens: Tensor
    """``Tensor[N, L]`` bool: the image pads (``mm_token_type_ids`` 1)."""
    positions: Tensor
    """``Tensor[3, N, L]``: the 3-D rope positions of the crops' tokens (the others are never attended)."""
    crops: dict[int, list[CropGeometry]]
    """Row -> the crops it was shown (rows that waited but opened none map to ``[]``)."""
    vision: VisionInputs | None
    """The crops' images, rows in order (None when no row opened one)."""
    images: dict[int, list[int]]
    """Row -> the indices of its crops in ``vision``."""


def crop_block(
    model: nn.Module,
    zoom: Zoom,
    rows: list[int],
    prompt_of: list[int],
    completions: list[Tensor],
    sequences: list[Tensor],
    mm_types: list[Tensor],
    prompt_grids: Tensor,
    n: int,
    pad_id: int,
    device: torch.device,
) -> CropBlock:
    """The block for the waiting ``rows``.

    ``completions[i]``: what waiting row ``rows[i]`` sampled so far (up to ``</look>``); ``sequences[i]`` /
    ``mm_types[i]``: its attended tokens so far (its prompt, then that completion) and their token types; ``prompt_grids[p]``: prompt ``p``'s image grid.
    The crops' positions come from the family's own ``get_rope_index`` over the whole sequence with the crops
    appended: exactly what a forward over the unpadded sequence computes.
    """
    crops, pixels, grids, images, blocks = {}, [], [], {}, {}
    count = 0
    for row, completion in zip(rows, completions):
        crops[row] = zoom.open(prompt_of[row], completion.tolist())
        if not crops[row]:
            continue
        values, grid = zoom.pixels(prompt_of[row], crops[row])
        pixels.append(values)
        grids.append(grid)
        images[row] = list(range(count, count + len(grid)))
        count += len(grid)
        blocks[row] = torch.tensor(zoom.tokens_for(grid), dtype=torch.long, device=device)
    width = max((len(b) for b in blocks.values()), default=0)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((n, width), dtype=torch.bool, device=device)
    positions = torch.zeros((3, n, width), dtype=torch.long, device=device)
    image_pad = zoom.tokens.image[1]
    for row, seq, types in zip(rows, sequences, mm_types):
        if row not in blocks:
            continue
        block = blocks[row]
        k = len(block)
        ids[row, width - k :] = block
        attention[row, width - k :] = True
        whole = torch.cat([seq.to(device), block])
        whole_types = torch.cat([types.to(device), (block == image_pad).to(types.dtype)])
        grid = torch.cat(
            [
                prompt_grids[prompt_of[row] : prompt_of[row] + 1].to(device),
                grids[_index(rows, blocks, row)].to(device),
            ]
        )
        pos = rope_index(model, whole[None], whole_types[None], grid)  # [3, 1, len]
        positions[:, row, width - k :] = pos[:, 0, -k:]
    vision = None
    if pixels:
        vision = VisionInputs.encode(model, torch.cat(pixels), torch.cat(grids).to(device))
    return CropBlock(ids, attention, ids == image_pad, positions, crops, vision, images)


def _index(rows: list[int], blocks: dict[int, Tensor], row: int) -> int:
    """The position of ``row`` among the rows that opened crops (the order of ``grids``)."""
    return [r for r in rows if r in blocks].index(row)
