"""Which completion tokens spell a block (``<think>``, ``<look>``, ``<answer>``).

GRPO gives every token of a completion the advantage of its total reward. A reward that scores one block
(the look reward scores ``<look>``) would then also reward or blame the tokens of the other blocks;
``RewardSuite(credit=...)`` sends it to that block's tokens, found here (``docs/look_reward.md``: on the tiny
base, answers after rewarded looks repeated the looked boxes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dip_r1.rewards import ParsedCompletion


def block_token_mask(
    tokenizer: Any, completion_ids: Tensor, mask: Tensor, parsed: list[ParsedCompletion], block: str
) -> Tensor:
    """``Tensor[N, T]`` bool: the completion tokens that spell part of ``block``'s content.

    ``completion_ids``, ``mask``: ``Tensor[N, T]``; ``parsed[i]`` is row ``i`` decoded with
    ``skip_special_tokens=True`` and parsed. A token overlapping the block's character span counts (``']]</'``
    ends the look and starts its closing tag). A completion without the block has no such token.
    """
    out = torch.zeros_like(mask, dtype=torch.bool)
    for i, completion in enumerate(parsed):
        span = (completion.block_spans or {}).get(block)
        if span is None or span[0] >= span[1]:
            continue
        ids = completion_ids[i][mask[i]].tolist()
        first = _token_spelling(tokenizer, ids, span[0])
        last = _token_spelling(tokenizer, ids, span[1] - 1)
        out[i, mask[i].nonzero().squeeze(1)[first : last + 1]] = True
    return out


def _token_spelling(tokenizer: Any, ids: list[int], char: int) -> int:
    """The index of the token that spells character ``char`` of ``decode(ids)``: the first ``k`` with
    ``len(decode(ids[: k + 1])) > char``, by bisection (a few decodes of a prefix, not one per token)."""
    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[: mid + 1], skip_special_tokens=True)) > char:
            hi = mid
        else:
            lo = mid + 1
    return lo
