"""Where a look box opens a crop, and how boxes read off the crop map back to the image.

Three frames meet here:

- the **source** image, in its own pixels (the decoded dataset image, before any resize);
- the **image frame**: the model's coordinates of the full prompt image (``target["coordinates"]``: pixels of
  the resized image for Qwen2.5-VL, 0..1000 of it for Qwen2-VL / Qwen3-VL / Qwen3.5);
- a **crop frame**: the same convention applied to the crop the model is shown (pixels of the resized crop,
  or 0..1000 of the crop).

A ``<look>`` box is in the image frame. :func:`crop_regions` turns the first ``max_looks`` valid ones into
:class:`CropGeometry` (clipped to the image, grown to ``min_side`` source pixels when smaller, resized to the
zoom budget); :meth:`CropGeometry.to_image` maps a box of an answer's ``"region": k`` to the image frame, so
rewards and metrics never convert.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dip_r1.data.prompts import smart_resize, to_image_coords, to_model_coords


@dataclass  # not frozen: Lightning moves a prediction holding crops to the CPU by rebuilding its dataclasses
class CropGeometry:
    """One crop: its box in source pixels, the size it is shown at, and the frames it maps between.

    >>> g = CropGeometry(box=(100.0, 50.0, 300.0, 250.0), size=(64, 64), coordinates="relative-1000",
    ...                  orig_size=(400, 300), resized_size=(160, 128))
    >>> g.to_image(torch.tensor([[0.0, 0.0, 500.0, 1000.0]])).tolist()  # left half of the crop, 0..1000 of the image
    [[250.0, 166.6666717529297, 500.0, 833.3333129882812]]
    >>> g.from_image(g.to_image(torch.tensor([[0.0, 0.0, 500.0, 1000.0]]))).round().tolist()
    [[0.0, 0.0, 500.0, 1000.0]]
    """

    box: tuple[float, float, float, float]
    """``(x1, y1, x2, y2)`` of the crop in source pixels."""
    size: tuple[int, int]
    """``(width, height)`` of the crop as the model sees it (a multiple of the patch factor)."""
    coordinates: str
    """The family's box convention: ``"absolute"`` or ``"relative-1000"``."""
    orig_size: tuple[int, int]
    """``(width, height)`` of the source image."""
    resized_size: tuple[int, int]
    """``(width, height)`` of the full prompt image as the model sees it."""

    @property
    def space(self) -> tuple[float, float]:
        """``(width, height)`` of the crop frame: the shown crop's pixels, or 1000 x 1000."""
        return (
            (float(self.size[0]), float(self.size[1])) if self.coordinates == "absolute" else (1000.0, 1000.0)
        )

    def _scale(self) -> Tensor:
        x1, y1, x2, y2 = self.box
        w, h = self.space
        return torch.tensor([(x2 - x1) / w, (y2 - y1) / h] * 2, dtype=torch.float64)

    def to_source(self, boxes: Tensor) -> Tensor:
        """Crop-frame boxes ``Tensor[N, 4]`` -> source pixels."""
        offset = torch.tensor(self.box[:2] * 2, dtype=torch.float64)
        return (boxes.reshape(-1, 4).to(torch.float64) * self._scale() + offset).to(torch.float32)

    def to_image(self, boxes: Tensor) -> Tensor:
        """Crop-frame boxes ``Tensor[N, 4]`` -> the image frame (float32)."""
        return to_model_coords(self.to_source(boxes), self.orig_size, self.resized_size, self.coordinates)

    def from_image(self, boxes: Tensor) -> Tensor:
        """The inverse of :meth:`to_image`: image-frame boxes -> the crop frame (teacher targets)."""
        source = to_image_coords(boxes, self.orig_size, self.resized_size, self.coordinates).to(torch.float64)
        offset = torch.tensor(self.box[:2] * 2, dtype=torch.float64)
        return ((source - offset) / self._scale()).to(torch.float32)


MAX_ASPECT = 100.0
"""A crop's long side is at most this many times its short one (within the image): Qwen's resize allows 200."""


def source_box(look_box: Tensor, target: Mapping[str, Any], min_side: float) -> tuple[float, ...] | None:
    """A look box (image frame) as a crop in source pixels: clipped to the image, grown around its centre to at
    least ``min_side`` pixels a side (within the image); None when it is not finite or has no area once
    clipped (entirely off the image).

    >>> t = {"orig_size": (200, 100), "resized_size": (200, 100), "coordinates": "absolute"}
    >>> source_box(torch.tensor([190.0, 10.0, 260.0, 20.0]), t, 32)  # clipped, then grown inside the image
    (168.0, 0.0, 200.0, 32.0)
    >>> source_box(torch.tensor([300.0, 10.0, 400.0, 20.0]), t, 32) is None  # off the image
    True
    >>> tall = {"orig_size": (1000, 10000), "resized_size": (100, 1000), "coordinates": "absolute"}
    >>> source_box(torch.tensor([0.0, 0.0, 0.1, 1000.0]), tall, 32)  # a sliver: widened to 1:100
    (0.0, 0.0, 100.0, 10000.0)
    """
    width, height = (float(v) for v in target["orig_size"])
    box = to_image_coords(
        look_box.reshape(1, 4), target["orig_size"], target["resized_size"], target["coordinates"]
    )
    x1, y1, x2, y2 = (float(v) for v in box[0])
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    x1, x2 = max(0.0, min(x1, width)), max(0.0, min(x2, width))
    y1, y2 = max(0.0, min(y1, height)), max(0.0, min(y2, height))
    if x2 <= x1 or y2 <= y1:
        return None
    x1, x2 = _grow(x1, x2, min_side, width)
    y1, y2 = _grow(y1, y2, min_side, height)
    # Qwen's resize refuses an aspect ratio above 200; the image itself is within it, so a crop can be too.
    x1, x2 = _grow(x1, x2, (y2 - y1) / MAX_ASPECT, width)
    y1, y2 = _grow(y1, y2, (x2 - x1) / MAX_ASPECT, height)
    return (x1, y1, x2, y2)


def _grow(lo: float, hi: float, side: float, limit: float) -> tuple[float, float]:
    """``[lo, hi]`` widened around its centre to ``side`` (at most ``limit``), shifted to stay in ``[0, limit]``."""
    side = min(side, limit)
    if hi - lo >= side:
        return lo, hi
    centre = (lo + hi) / 2
    lo = min(max(0.0, centre - side / 2), limit - side)
    return lo, lo + side


def shown_size(box: tuple[float, ...], factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` a crop is shown at: magnified (or reduced) to fill ``max_pixels`` with its aspect
    ratio, sides multiples of ``factor`` (Qwen's ``smart_resize``).

    >>> shown_size((0.0, 0.0, 40.0, 30.0), 32, 1024, 160 * 120)  # 4x larger, then within the budget
    (160, 96)
    >>> shown_size((0.0, 0.0, 16.0, 310.0), 32, 1024, 160 * 120)  # smart_resize alone gives 32 x 608, over it
    (32, 576)
    """
    w, h = box[2] - box[0], box[3] - box[1]
    scale = math.sqrt(max_pixels / (w * h))
    rh, rw = smart_resize(
        max(1, round(h * scale)),
        max(1, round(w * scale)),
        factor,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    if (
        rw * rh > max_pixels
    ):  # smart_resize keeps a thin side at one factor, which can leave it over the budget
        if rw >= rh:
            rw = max(factor, max_pixels // rh // factor * factor)
        else:
            rh = max(factor, max_pixels // rw // factor * factor)
    return rw, rh


def crop_regions(
    look: Tensor | None,
    target: Mapping[str, Any],
    *,
    max_looks: int,
    min_side: float,
    factor: int,
    min_pixels: int,
    max_pixels: int,
) -> list[CropGeometry]:
    """The crops a completion's ``<look>`` boxes open: the first ``max_looks`` boxes that have an area on the
    image, in order (the ``k``-th is what ``"region": k`` names); never raises.

    ``target`` carries ``orig_size``, ``resized_size`` and ``coordinates`` (the prompt builder's target).
    """
    crops: list[CropGeometry] = []
    if look is None or max_looks < 1:
        return crops
    for row in look.reshape(-1, 4)[: 64 * max_looks]:  # a look of thousands of off-image boxes stays cheap
        box = source_box(row, target, min_side)
        if box is None:
            continue
        crops.append(
            CropGeometry(
                box=box,
                size=shown_size(box, factor, min_pixels, max_pixels),
                coordinates=target["coordinates"],
                orig_size=tuple(target["orig_size"]),
                resized_size=tuple(target["resized_size"]),
            )
        )
        if len(crops) == max_looks:
            break
    return crops
