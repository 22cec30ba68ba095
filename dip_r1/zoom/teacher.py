"""Teacher forcing through crops: a batch of prompts, each followed by a written completion with its crops
inserted, as one multi-image forward.

A zoom teacher completion (:class:`~dip_r1.zoom.targets.ZoomTarget`) is written in two parts with the crops of
its look between them. :func:`teacher_batch` lays out, per row, exactly the sequence a zoom rollout that wrote
that text would hold (prompt, look text, ``[vision start, image pads, vision end]`` per crop, answer text,
EOS), the crops cut and magnified by the rollout's own :class:`~dip_r1.zoom.crops.Zoom`; the model's plain
forward then computes the images and their 3-D positions, as for any multi-image chat. The crop tokens are
attended but not supervised. :func:`teacher_logprobs` gives the log-probability of every written token.

A row may also be plain text (a text-look target): no crops, as in ``SFTModule``'s text targets.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dip_r1.grpo import token_logprobs
from dip_r1.zoom.crops import Zoom
from dip_r1.zoom.targets import ZoomTarget, zoom_target


@dataclass
class TeacherBatch:
    """Prompts and written completions as one right-padded multi-image batch."""

    inputs: dict[str, Tensor]
    """The model's keyword arguments: ``input_ids``, ``attention_mask`` ``[B, L]``, every image's
    ``pixel_values`` and ``image_grid_thw`` in sequence order (row 0's prompt image, its crops, row 1's ...),
    and ``mm_token_type_ids`` when the prompts carried them."""
    supervised: Tensor
    """``Tensor[B, K]`` bool over the last ``K`` columns (from the earliest written one): the written tokens
    (prompt, crop and padding columns are not)."""

    @property
    def completion_ids(self) -> Tensor:
        """``Tensor[B, K]``: the last ``K`` columns of ``input_ids``."""
        return self.inputs["input_ids"][:, -self.supervised.shape[1] :]


def teacher_batch(
    zoom: Zoom,
    inputs: Mapping[str, Tensor],
    completions: Sequence[ZoomTarget | str],
    eos_id: int,
    max_tokens: int = 1024,
) -> TeacherBatch:
    """Row ``i``: prompt ``i`` of the processor batch ``inputs`` (its padding dropped, one image per prompt), then
    ``completions[i]`` (a zoom target, its crops inserted after ``</look>``; or a text) and EOS.

    Written tokens past ``max_tokens`` are cut, and a cut completion gets no EOS (teaching EOS mid-answer
    would teach the policy to stop early), as ``SFTModule`` does."""
    tok = zoom.tokenizer
    image_pad = zoom.tokens.image[1]
    grids = inputs["image_grid_thw"]
    sizes = grids.prod(dim=-1).tolist()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    rows, kinds, written, pixels, row_grids = [], [], [], [], []
    for i, completion in enumerate(completions):
        keep = inputs["attention_mask"][i].bool()
        prompt = inputs["input_ids"][i][keep].tolist()
        types = (
            inputs["mm_token_type_ids"][i][keep].tolist()
            if "mm_token_type_ids" in inputs
            else [int(t == image_pad) for t in prompt]
        )
        pixels.append(inputs["pixel_values"][starts[i] : starts[i] + sizes[i]])
        row_grids.append(grids[i : i + 1])
        parts: list[tuple[list[int], bool]] = []  # (ids, written)
        if isinstance(completion, ZoomTarget):
            parts.append((tok(completion.look_text, add_special_tokens=False)["input_ids"], True))
            if completion.crops:
                values, grid = zoom.pixels(i, completion.crops)
                pixels.append(values)
                row_grids.append(grid)
                parts.append((zoom.tokens_for(grid), False))
            parts.append((tok(completion.answer_text, add_special_tokens=False)["input_ids"], True))
        else:
            parts.append((tok(completion, add_special_tokens=False)["input_ids"], True))
        ids, mark, budget = [], [], max_tokens
        for part, is_written in parts:
            if is_written:
                part = part[:budget]
                budget -= len(part)
            ids += part
            mark += [is_written] * len(part)
        if budget > 0:
            ids.append(eos_id)
            mark.append(True)
        rows.append(prompt + ids)
        kinds.append(types + [int(t == image_pad) for t in ids])
        written.append(mark)
    # Right padding: a pad after a row's tokens changes none of them, even in a family whose layers carry a
    # recurrent state (Qwen3.5's linear attention), where left padding would.
    width = max(len(r) for r in rows)
    first = [len(r) - len(w) for r, w in zip(rows, written)]  # each row's first written column
    k = width - min(first)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    n = len(rows)
    ids = torch.full((n, width), pad, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    types = torch.zeros((n, width), dtype=torch.long)
    supervised = torch.zeros((n, k), dtype=torch.bool)
    for i, (row, kind, mark) in enumerate(zip(rows, kinds, written)):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        types[i, : len(row)] = torch.tensor(kind)
        at = first[i] - (width - k)
        supervised[i, at : at + len(mark)] = torch.tensor(mark)
    device = inputs["input_ids"].device
    out = {
        "input_ids": ids.to(device),
        "attention_mask": attention.to(device),
        "pixel_values": torch.cat([p.to(inputs["pixel_values"]) for p in pixels]),
        "image_grid_thw": torch.cat(row_grids).to(grids),
    }
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = types.to(device)
    return TeacherBatch(out, supervised.to(device))


def zoom_targets(zoom: Zoom, rng: random.Random | None = None) -> list[ZoomTarget]:
    """The zoom teacher completion of each of the batch's prompts, its crops opened as the rollout opens them
    (:meth:`Zoom.crop_settings`); ``rng`` varies the margins around the looked groups."""
    return [zoom_target(t, rng=rng, **zoom.crop_settings(i)) for i, t in enumerate(zoom.targets)]


def teacher_logprobs(model: nn.Module, batch: TeacherBatch, temperature: float = 1.0) -> Tensor:
    """``Tensor[B, K]``: the log-probability of each of the last ``K`` tokens given what precedes it (read it
    where ``batch.supervised``); gradients flow when enabled, the vision tower's included."""
    k = batch.supervised.shape[1]
    logits = model(**batch.inputs, logits_to_keep=k + 1, use_cache=False).logits  # [B, K + 1, V]
    return token_logprobs(logits[:, :-1], batch.completion_ids, temperature)
