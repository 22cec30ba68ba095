"""Which completion tokens a reward's advantage reaches.

GRPO gives every token of a completion the advantage of its total reward. A reward that scores one block of
the completion (the look reward scores ``<look>``) then also rewards or blames the tokens of the other blocks:
the answer written after a look that scored well is reinforced whatever its accuracy. With
``RewardSuite(credit={"look": "look"})`` the tokens of the look block get the advantage of every reward and the
other tokens the advantage of the rewards not credited to a block (BENCHMARKS.md, issue 10: on the tiny base,
answers after rewarded looks repeated the looked boxes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dip_r1 import grpo
from dip_r1.rewards import ParsedCompletion, RewardSuite


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


def credited_advantages(
    suite: RewardSuite,
    scores: dict[str, Tensor],
    advantages: Tensor,
    tokenizer: Any,
    completion_ids: Tensor,
    mask: Tensor,
    parsed: list[ParsedCompletion],
    group_size: int,
    scale: str = "group",
) -> Tensor:
    """Per-token advantages ``Tensor[N, T]`` under ``suite.credit``; ``advantages`` (``Tensor[N]``, of the whole
    total) are returned as they are when no reward is credited to a block."""
    if not suite.credit:
        return advantages
    credited = set(suite.credit)
    outside = grpo.group_advantages(suite.weighted_total(scores, without=credited), group_size, scale)
    out = outside.to(advantages)  # [N], then [N, T]
    for block in dict.fromkeys(suite.credit.values()):
        others = {name for name, b in suite.credit.items() if b != block}
        inside = grpo.group_advantages(suite.weighted_total(scores, without=others), group_size, scale)
        tokens = block_token_mask(tokenizer, completion_ids, mask, parsed, block).to(mask.device)
        out = grpo.block_advantages(out, inside.to(out), tokens)
    return out
