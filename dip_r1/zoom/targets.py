"""Teacher targets for the zoom look: what a policy that uses its crops writes, built from the ground truth.

:func:`zoom_target` looks at the densest groups of people, opens exactly the crops the rollout would open for
that look, and answers the people a crop holds in that crop's frame (``"region": k``), the others in the image
frame. The zoom SFT arm and the zoom pretraining stage train on it.

The look rule (deterministic; ``rng`` only varies the margin around each group):

1. A person's *neighbours* are the people not yet looked at whose box centre lies within the person's box
   grown by its own width and height on each side (three times the box, about its centre), in source pixels.
2. The densest group is the person with the most neighbours, with them (the first in target order on ties);
   it needs at least :data:`MIN_GROUP` people: a scene with no such group gets no look.
3. Its region is the box around the group, grown by a margin of each side (``0.1``; with ``rng``, drawn in
   ``[0.05, 0.25]``), then grown about its centre to the image's aspect ratio and to at least ``min_size``
   (shifted back inside the image). A region larger than :data:`MAX_SHARE` of the image (a crop that shows
   little more than the full view), or one sharing more than :data:`MAX_OVERLAP` of its area with an earlier
   region, is not looked at.
4. The group's people are then taken, and the rule repeats until ``max_looks`` regions or no group is left.

Why the shape: :func:`zoom_target` gives ``min_size`` as the region that holds the prompt's pixel budget (the
full view's) at the source's own resolution, so with the default crop budget a crop is shown exactly as the full
view of an image of the budget's size is: the same token grid, figures at the scale the base learned to read,
not magnified past the source's pixels (a ``zoom_max_pixels`` above the prompt's budget magnifies further). (Regions shaped
like their group gave crops of every grid, figures two to four times the size the base had seen, and the
tiny base read them at half the precision of the full view; BENCHMARKS.md, "A tiny base that zooms".) A source
the budget already shows whole gets no look.

A person is answered in crop ``k``'s frame when its whole box lies in the crop (the first such crop); a box cut
by a crop's edge cannot be read off that crop, so it stays in the image frame.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dip_r1.data.prompts import format_completion, to_image_coords, to_model_coords
from dip_r1.rewards.parsing import parse_completion
from dip_r1.zoom.geometry import CropGeometry, crop_regions

MIN_GROUP = 2
"""The fewest people a looked-at group holds."""
MAX_SHARE = 0.5
"""A region covering more than this share of the image is not looked at."""
MAX_OVERLAP = 0.25
"""A region may share at most this share of its area with an earlier one (so two crops of the budget's size fit
side by side on an image of about twice the budget)."""
LOOK_END = "</look>"


@dataclass(frozen=True)
class ZoomTarget:
    """One teacher completion of the zoom look, in the two parts the rollout writes, and the crops between."""

    look_text: str
    """``<think>…</think>\\n<look>[[…]]</look>``: what is written before the crops are shown."""
    crops: list[CropGeometry]
    """The crops the look opens (:func:`~dip_r1.zoom.geometry.crop_regions`, as the rollout opens them)."""
    answer_text: str
    """``\\n<answer>[…]</answer>``: what is written after them; ``"region": k`` names ``crops[k - 1]``."""
    text_answer: str = ""
    """The same answer without crops, every box in the image frame: what follows the same look in the text
    look (no crop is shown), so that one policy learns both modes from the same think and look."""

    @property
    def text(self) -> str:
        """The whole completion as decoded (the crops are image tokens, which decode to no text)."""
        return self.look_text + self.answer_text

    @property
    def text_look(self) -> str:
        """The completion of the text look: the same think and look, the answer in the image frame."""
        return self.look_text + self.text_answer


def zoom_target(
    target: Mapping[str, Any],
    *,
    max_looks: int = 2,
    min_side: float = 32,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    rng: random.Random | None = None,
    category: str | None = None,
) -> ZoomTarget:
    """The completion a policy that zooms writes for ``target`` (the prompt builder's: ``boxes`` in the image
    frame, ``labels``, ``orig_size``, ``resized_size``, ``coordinates``); the crop settings are the rollout's.

    Looks follow the module's rule; the answer lists the people of crop 1, then of crop 2, ..., then the
    others, each group in target order.
    """
    boxes = (
        torch.as_tensor(target["boxes"]).detach().cpu().float().reshape(-1, 4)
    )  # a batch's may be on the GPU
    labels = list(target.get("labels") or ["object"] * len(boxes))
    name = category or (max(set(labels), key=labels.count) if labels else "object")
    sizes = (target["orig_size"], target["resized_size"], target["coordinates"])
    # The full view's budget (the prompt's; the crop's when the target does not say): a region holds at least
    # that many source pixels, so a crop shows the source at its own resolution, or magnified past it when the
    # crop's budget (``max_pixels``) is larger.
    prompt_pixels = target["resize"][2] if "resize" in target else max_pixels
    source = to_image_coords(boxes, *sizes)
    regions = dense_regions(
        source,
        target["orig_size"],
        max_looks=max_looks,
        rng=rng,
        min_size=budget_size(target["orig_size"], prompt_pixels),
    )
    look = torch.round(to_model_coords(torch.tensor(regions).reshape(-1, 4), *sizes))
    # What the rollout does with the look text: parse it (a box rounded to no area is dropped) and open crops.
    look = parse_completion(format_completion("", look, boxes[:0], [])).look
    crops = crop_regions(
        look,
        target,
        max_looks=max_looks,
        min_side=min_side,
        factor=factor,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    look = look[: len(crops)]  # every kept box opens a crop: the k-th box is region k
    shown = [_first_crop(box, crops) for box in source.tolist()]
    order = sorted(range(len(boxes)), key=lambda i: (shown[i] is None, shown[i] or 0, i))
    answer = torch.stack(
        [crops[shown[i] - 1].from_image(boxes[i : i + 1])[0] if shown[i] else boxes[i] for i in order]
    ) if order else boxes  # fmt: skip
    inside = sum(k is not None for k in shown)
    think = (
        f"{len(boxes)} {name}s, {inside} in {len(crops)} crowded regions."
        if crops
        else f"{len(boxes)} {name}s, none crowded."
    )
    text = format_completion(think, look, answer, [labels[i] for i in order], [shown[i] for i in order])
    cut = text.index(LOOK_END) + len(LOOK_END)
    plain = format_completion(think, look, boxes, labels)
    return ZoomTarget(text[:cut], crops, text[cut:], plain[plain.index(LOOK_END) + len(LOOK_END) :])


def budget_size(size: tuple[int, int], max_pixels: int) -> tuple[float, float]:
    """``(width, height)`` of the region of an image of ``size`` with the image's aspect ratio that holds
    ``max_pixels`` source pixels (at most the image): its crop is shown at the source's own resolution.

    >>> [round(v, 1) for v in budget_size((320, 240), 22000)]  # 29% of the image
    [171.3, 128.5]
    >>> budget_size((160, 120), 22000)  # the budget shows this source whole: no region is smaller
    (160.0, 120.0)
    """
    width, height = float(size[0]), float(size[1])
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    return width * scale, height * scale


def dense_regions(
    boxes: Tensor,
    size: tuple[int, int],
    *,
    max_looks: int,
    rng: random.Random | None = None,
    min_size: tuple[float, float] = (0.0, 0.0),
) -> list[tuple[float, float, float, float]]:
    """The regions (source pixels) looked at for people ``boxes`` (source pixels) on an image of ``size``
    (``(width, height)``), by the module's rule; each at least ``min_size`` and of the image's aspect ratio.

    >>> people = torch.tensor([[10.0, 10, 20, 30], [22, 10, 32, 30], [34, 12, 44, 32], [150, 60, 160, 80]])
    >>> dense_regions(people, (200, 100), max_looks=2)  # three side by side, widened to 2:1; the fourth: no look
    [(0.6, 7.8, 53.4, 34.2)]
    >>> dense_regions(people, (200, 100), max_looks=2, min_size=(60, 30))  # grown, then shifted inside
    [(0.0, 6.0, 60.0, 36.0)]
    """
    width, height = float(size[0]), float(size[1])
    rows = boxes.reshape(-1, 4).tolist()
    taken = [False] * len(rows)
    regions: list[tuple[float, float, float, float]] = []
    while len(regions) < max_looks:
        groups = [_neighbours(i, rows, taken) for i in range(len(rows)) if not taken[i]]
        group = max(groups, key=len, default=[])  # max keeps the first of equals
        if len(group) < MIN_GROUP:
            break
        for j in group:
            taken[j] = True
        margin = 0.1 if rng is None else rng.uniform(0.05, 0.25)
        x1, y1 = min(rows[j][0] for j in group), min(rows[j][1] for j in group)
        x2, y2 = max(rows[j][2] for j in group), max(rows[j][3] for j in group)
        dx, dy = margin * (x2 - x1), margin * (y2 - y1)
        region = _shaped(x1 - dx, y1 - dy, x2 + dx, y2 + dy, width, height, min_size)
        area = (region[2] - region[0]) * (region[3] - region[1])
        if area > MAX_SHARE * width * height or any(
            _overlap(region, r) > MAX_OVERLAP * area for r in regions
        ):
            continue
        regions.append(tuple(round(v, 6) for v in region))
    return regions


def _shaped(
    x1: float, y1: float, x2: float, y2: float, width: float, height: float, min_size: tuple[float, float]
) -> tuple[float, float, float, float]:
    """The box grown about its centre to the image's aspect ratio and ``min_size``, shifted inside the image."""
    w = max(x2 - x1, (y2 - y1) * width / height, min_size[0])
    h = max(w * height / width, min_size[1])
    w, h = min(w, width), min(h, height)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = min(max(0.0, cx - w / 2), width - w)
    top = min(max(0.0, cy - h / 2), height - h)
    return left, top, left + w, top + h


def _neighbours(i: int, rows: list[list[float]], taken: list[bool]) -> list[int]:
    """Person ``i`` and the people not taken whose centre lies in ``i``'s box grown by its size on each side."""
    x1, y1, x2, y2 = rows[i]
    w, h = x2 - x1, y2 - y1
    group = [i]
    for j, (a1, b1, a2, b2) in enumerate(rows):
        cx, cy = (a1 + a2) / 2, (b1 + b2) / 2
        if j != i and not taken[j] and x1 - w <= cx <= x2 + w and y1 - h <= cy <= y2 + h:
            group.append(j)
    return group


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """The area two boxes share."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _first_crop(box: list[float], crops: list[CropGeometry], tolerance: float = 0.5) -> int | None:
    """The 1-based index of the first crop holding the whole ``box`` (source pixels), else None."""
    x1, y1, x2, y2 = box
    for k, crop in enumerate(crops, start=1):
        c1, d1, c2, d2 = crop.box
        if x1 >= c1 - tolerance and y1 >= d1 - tolerance and x2 <= c2 + tolerance and y2 <= d2 + tolerance:
            return k
    return None
