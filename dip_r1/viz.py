"""Pictures of what the policy does, with PIL only: detections on an image, and a GRPO group.

Colours (RGB): with ground truth, matched predictions :data:`TRUE` (green), false ones :data:`FALSE` (red),
missed ground truth :data:`MISSED` (yellow), ignore regions :data:`IGNORE` (grey); without it, predictions
:data:`PRED` (cyan). Look regions are dashed, :data:`LOOK` (blue) or the completion's colour in a group.
Scores print as ``exp(mean token log-prob)``, the geometric-mean probability of the box's tokens.

Zoom look: each crop the completion was shown is outlined on the picture (:data:`CROP`, or the completion's
colour in a group, numbered ``k`` as ``"region": k`` names it) and drawn as an inset below it, cut from the
source image, with the boxes read off it drawn inside (:func:`crop_inset`, :func:`attach_insets`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from dip_r1.rewards.functional import as_numpy_boxes, match_detections, rasterize_boxes
from dip_r1.zoom.geometry import CropGeometry

PRED = (0, 200, 255)
TRUE = (0, 220, 0)
FALSE = (255, 40, 40)
MISSED = (255, 210, 0)
IGNORE = (150, 150, 150)
LOOK = (70, 110, 255)
CROP = (230, 0, 230)
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
]
"""One colour per completion of a group (cycled past 8)."""


def scale_boxes(
    boxes: Tensor | np.ndarray | None, from_size: Sequence[float], to_size: Sequence[float]
) -> np.ndarray:
    """Boxes from a ``(width, height)`` coordinate space to another, as ``[N, 4]`` float64.

    >>> scale_boxes(np.array([[100.0, 100, 500, 500]]), (1000, 1000), (200, 100)).tolist()
    [[20.0, 10.0, 100.0, 50.0]]
    """
    b = as_numpy_boxes(boxes).astype(np.float64)
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return b * np.array([sx, sy, sx, sy])


def _canvas(image: Image.Image, min_size: int) -> Image.Image:
    """An RGB copy, enlarged so that its shorter side is at least ``min_size`` (labels stay readable)."""
    image = image.convert("RGB")
    factor = min_size / max(1, min(image.size))
    if factor > 1:
        return image.resize(
            (round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC
        )
    return image.copy()


def _rect(draw: ImageDraw.ImageDraw, box: Sequence[float], colour, width: int) -> None:
    x1, y1, x2, y2 = box
    draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=width)


def dashed_rect(
    draw: ImageDraw.ImageDraw, box: Sequence[float], colour, width: int = 2, dash: int = 5, gap: int = 4
) -> None:
    """A rectangle outline of dashes ``dash`` pixels long, ``gap`` apart."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x2, y2 = max(x1, x2 - 1), max(y1, y2 - 1)
    for (ax, ay), (bx, by) in (
        ((x1, y1), (x2, y1)),
        ((x2, y1), (x2, y2)),
        ((x2, y2), (x1, y2)),
        ((x1, y2), (x1, y1)),
    ):
        length = math.hypot(bx - ax, by - ay)
        pos = 0.0
        while pos < length:
            end = min(pos + dash, length)
            t0, t1 = pos / max(length, 1e-9), end / max(length, 1e-9)
            draw.line(
                [(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                fill=colour,
                width=width,
            )
            pos += dash + gap


def _label(draw: ImageDraw.ImageDraw, box: Sequence[float], text: str, colour) -> None:
    """``text`` on a filled tag just above the box (inside it when the box touches the top)."""
    x1, y1 = box[0], box[1]
    left, top, right, bottom = draw.textbbox((0, 0), text)
    w, h = right - left + 2, bottom - top + 2
    y = y1 - h if y1 - h >= 0 else y1
    draw.rectangle([x1, y, x1 + w, y + h], fill=colour)
    draw.text((x1 + 1 - left, y + 1 - top), text, fill=(0, 0, 0))


def draw_detections(
    image: Image.Image,
    boxes: Tensor | np.ndarray | None,
    scores: Tensor | Sequence[float] | None = None,
    *,
    look: Tensor | np.ndarray | None = None,
    gt: Tensor | np.ndarray | None = None,
    ignore: Tensor | np.ndarray | None = None,
    coord_size: Sequence[float] | None = None,
    iou_threshold: float = 0.5,
    width: int = 2,
    min_size: int = 0,
    crops: Sequence[CropGeometry] = (),
    source: Image.Image | None = None,
    regions: Sequence[int | None] | None = None,
) -> Image.Image:
    """The image with predicted boxes and their scores, look regions dashed and, when ``gt`` is given,
    true (matched one-to-one at ``iou_threshold``, as the accuracy reward), false and missed boxes.

    Boxes are in ``coord_size`` (``(width, height)`` of their coordinate space; None: the image's pixels).
    ``scores`` are mean token log-probabilities. ``min_size`` enlarges small images first. With ``crops`` and
    their ``source`` image (zoom), each crop is outlined and shown as an inset below the picture with the boxes
    whose ``regions`` entry names it (in their colours).
    """
    canvas = _canvas(image, min_size)
    src = coord_size or image.size
    draw = ImageDraw.Draw(canvas)
    pred = scale_boxes(boxes, src, canvas.size)
    colours = [PRED] * len(pred)
    if gt is not None:
        gt_px, ignore_px = scale_boxes(gt, src, canvas.size), scale_boxes(ignore, src, canvas.size)
        m = match_detections(pred, gt_px, ignore_px, iou_threshold=iou_threshold)
        colours = [FALSE] * len(pred)
        for i in m.pred_index:
            colours[i] = TRUE
        for box in ignore_px:
            dashed_rect(draw, box, IGNORE, width=1)
        found = set(m.gt_index.tolist())
        for j, box in enumerate(gt_px):
            if j not in found:
                _rect(draw, box, MISSED, width)
    for box in scale_boxes(look, src, canvas.size):
        dashed_rect(draw, box, LOOK, width)
    score_list = [] if scores is None else [float(s) for s in scores]
    for i, box in enumerate(pred):
        _rect(draw, box, colours[i], width)
    for i, box in enumerate(pred):  # labels last, so that no box is drawn over a score
        if i < len(score_list) and math.isfinite(score_list[i]):
            _label(draw, box, f"{math.exp(score_list[i]):.2f}", colours[i])
    if not crops or source is None:
        return canvas
    insets = []
    for k, crop in enumerate(crops, start=1):
        outline = scale_boxes([crop.box], crop.orig_size, canvas.size)[0]
        _rect(draw, outline, CROP, width)
        _label(draw, outline, str(k), CROP)
        rows = [i for i, r in enumerate(regions or []) if r == k and i < len(pred)]
        read = as_numpy_boxes(boxes)[rows]  # the image frame, which the crop's geometry maps from
        insets.append(crop_inset(source, crop, read, [colours[i] for i in rows], k, CROP, canvas.height // 2))
    return attach_insets(canvas, insets)


def group_variance(answers: Sequence[Tensor | None], coord_size: Sequence[float], grid: int = 32) -> Tensor:
    """``Tensor[grid, grid]``: U = p (1 - p), p the share of the group whose answer covers each cell.

    The look reward's disagreement map (:func:`dip_r1.rewards.functional.look_reward`), from the same
    rasterisation.
    """
    p = rasterize_boxes(list(answers), (float(coord_size[0]), float(coord_size[1])), grid).double().mean(0)
    return p * (1 - p)


def draw_group(
    image: Image.Image,
    answers: Sequence[Tensor | None],
    looks: Sequence[Tensor | None],
    coord_size: Sequence[float],
    *,
    grid: int = 32,
    width: int = 2,
    min_size: int = 0,
    gap: int = 4,
    crops: Sequence[Sequence[CropGeometry]] | None = None,
    source: Image.Image | None = None,
    regions: Sequence[Sequence[int | None] | None] | None = None,
) -> Image.Image:
    """A GRPO group side by side: left, the G answers overlaid (one colour per completion, :data:`PALETTE`);
    right, the group-variance heatmap that drives the look reward (red, brighter where the answers disagree)
    with each completion's look boxes dashed in its colour.

    Zoom: ``crops[g]`` (the crops completion ``g`` was shown), ``source`` (the image they were cut from) and
    ``regions[g]`` (its answer's :attr:`~dip_r1.rewards.ParsedCompletion.regions`) add each crop's outline on
    the left panel and an inset below, in the completion's colour.
    """
    left = _canvas(image, min_size)
    size = (left.width, left.height)
    draw = ImageDraw.Draw(left)
    for g, boxes in enumerate(answers):
        for box in scale_boxes(boxes, coord_size, size):
            _rect(draw, box, PALETTE[g % len(PALETTE)], width)
    u = group_variance(answers, coord_size, grid)
    heat = (u / 0.25).clamp(0, 1).numpy()  # 0.25 = the largest p (1 - p)
    cells = Image.fromarray((heat * 255).astype(np.uint8), mode="L").resize(size, Image.Resampling.NEAREST)
    dim = Image.blend(left.convert("L").convert("RGB"), Image.new("RGB", size, (0, 0, 0)), 0.5)
    red = Image.new("RGB", size, (255, 30, 0))
    right = Image.composite(red, dim, cells.point(lambda v: int(v * 0.8)))
    draw = ImageDraw.Draw(right)
    for g, boxes in enumerate(looks):
        for box in scale_boxes(boxes, coord_size, size):
            dashed_rect(draw, box, PALETTE[g % len(PALETTE)], width)
    insets = []
    for g, shown in enumerate(crops if crops and source is not None else []):
        colour = PALETTE[g % len(PALETTE)]
        draw = ImageDraw.Draw(left)
        for k, crop in enumerate(shown, start=1):
            _rect(draw, scale_boxes([crop.box], crop.orig_size, size)[0], colour, width)
            rows = [i for i, r in enumerate((regions or [])[g] or []) if r == k]
            read = as_numpy_boxes(answers[g])[rows] if rows and answers[g] is not None else None
            insets.append(crop_inset(source, crop, read, [colour] * len(rows), k, colour, size[1] // 2))
    out = Image.new("RGB", (2 * size[0] + gap, size[1]), (255, 255, 255))
    out.paste(left, (0, 0))
    out.paste(right, (size[0] + gap, 0))
    return attach_insets(out, insets, gap) if insets else out


def crop_inset(
    source: Image.Image,
    crop: CropGeometry,
    boxes: Tensor | np.ndarray | None,
    colours: Sequence[tuple[int, int, int]],
    number: int,
    outline: tuple[int, int, int],
    height: int,
    width: int = 2,
) -> Image.Image:
    """A crop as the model saw it, cut from ``source`` and ``height`` pixels tall (at most 3x as wide), framed
    in ``outline`` and numbered; ``boxes`` (in the image frame, one colour each) are drawn where they fall in it.
    """
    w, h = crop.box[2] - crop.box[0], crop.box[3] - crop.box[1]
    height = max(32, height)
    tile_size = (max(1, min(3 * height, round(height * w / max(h, 1e-9)))), height)
    tile = source.crop(crop.box).convert("RGB").resize(tile_size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(tile)
    if boxes is not None and len(as_numpy_boxes(boxes)):
        in_crop = crop.from_image(torch.from_numpy(as_numpy_boxes(boxes).astype(np.float32)))
        for box, colour in zip(scale_boxes(in_crop, crop.space, tile_size), colours):
            _rect(draw, box, colour, width)
    _rect(draw, (0, 0, *tile_size), outline, width)
    _label(draw, (0, 0), str(number), outline)
    return tile


def attach_insets(picture: Image.Image, insets: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """``picture`` with ``insets`` in rows below it, left to right, a new row when one would be wider than it."""
    rows: list[list[Image.Image]] = [[]]
    for inset in insets:
        used = sum(i.width + gap for i in rows[-1])
        if rows[-1] and used + inset.width > picture.width:
            rows.append([])
        rows[-1].append(inset)
    widths = [sum(i.width for i in row) + gap * (len(row) - 1) for row in rows]
    heights = [max(i.height for i in row) for row in rows]
    out = Image.new(
        "RGB",
        (max([picture.width, *widths]), picture.height + sum(h + gap for h in heights)),
        (255, 255, 255),
    )
    out.paste(picture, (0, 0))
    y = picture.height + gap
    for row, row_height in zip(rows, heights):
        x = 0
        for inset in row:
            out.paste(inset, (x, y))
            x += inset.width + gap
        y += row_height + gap
    return out


def to_array(image: Image.Image) -> np.ndarray:
    """``uint8 [H, W, 3]``: what ``SummaryWriter.add_image(..., dataformats="HWC")`` takes."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
