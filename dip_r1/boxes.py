"""Box operations shared by the rewards, the metrics and the data readers.

All boxes are float tensors in corner form ``[x1, y1, x2, y2]`` (xyxy).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def empty_boxes() -> Tensor:
    """A ``Tensor[0, 4]`` of float32 boxes."""
    return torch.zeros((0, 4), dtype=torch.float32)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``.

    >>> xywh_to_xyxy(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).tolist()
    [[1.0, 2.0, 4.0, 6.0]]
    """
    return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of each box, ``Tensor[N]``; degenerate boxes have area 0."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    # a: [N, 4], b: [M, 4] -> [N, M]
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise intersection over union, ``Tensor[N, M]``.

    >>> box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 0, 3, 2], [5.0, 5, 6, 6]]))
    tensor([[0.3333, 0.0000]])
    """
    inter = _intersection(a, b)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


DUPLICATE_IOU = 0.7
"""An answer box that overlaps an earlier box of the same answer at this IoU or more is a repeat."""


def repeated_boxes(boxes: Tensor | None, iou: float = DUPLICATE_IOU) -> int:
    """How many boxes overlap an earlier box of the list at IoU >= ``iou`` (repeats of one object, which the
    one-to-one matching counts as false positives).

    >>> repeated_boxes(torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 9], [20.0, 0, 30, 10]]))
    1
    """
    if boxes is None or len(boxes) < 2:
        return 0
    overlaps = box_iou(boxes, boxes).triu(diagonal=1) >= iou  # [N, N]: pairs (earlier, later)
    return int(overlaps.any(dim=0).sum())


def box_ioa(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise intersection over the area of ``a`` (the CrowdHuman / CityPersons ignore rule).

    >>> box_ioa(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 0, 3, 2]]))
    tensor([[0.5000]])
    """
    inter = _intersection(a, b)
    area = box_area(a)[:, None]
    return torch.where(area > 0, inter / area.clamp(min=1e-12), torch.zeros_like(inter))


def clip_boxes(boxes: Tensor, width: float, height: float) -> Tensor:
    """Clip boxes to the image ``[0, width] x [0, height]``."""
    out = boxes.clone()
    out[..., 0::2] = out[..., 0::2].clamp(0, width)
    out[..., 1::2] = out[..., 1::2].clamp(0, height)
    return out


def valid_boxes(boxes: Tensor) -> Tensor:
    """Mask of boxes with finite coordinates and positive width and height, ``Tensor[N]`` bool."""
    if boxes.numel() == 0:
        return torch.zeros(boxes.shape[0], dtype=torch.bool)
    finite = torch.isfinite(boxes).all(dim=-1)
    return finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def box_iou_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`box_iou` on numpy arrays, ``[N, M]``; float32 when both inputs are, else float64.

    The rewards run it on every completion: on 150 x 150 boxes numpy is several times faster than
    torch, whose intra-op threads cost more than they save on arrays this small.

    >>> box_iou_numpy(np.array([[0.0, 0, 2, 2]]), np.array([[1.0, 0, 3, 2]])).round(4).tolist()
    [[0.3333]]
    """
    inter, area_a, area_b = _intersection_numpy(a, b)
    union = np.add.outer(area_a, area_b)
    union -= inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_ioa_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`box_ioa` on numpy arrays: intersection over the area of ``a``, ``[N, M]``.

    >>> box_ioa_numpy(np.array([[0.0, 0, 2, 2]]), np.array([[1.0, 0, 3, 2]])).tolist()
    [[0.5]]
    """
    inter, area_a, _ = _intersection_numpy(a, b)
    area = np.broadcast_to(area_a[:, None], inter.shape)
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


def _intersection_numpy(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    dtype = np.float32 if a.dtype == b.dtype == np.float32 else np.float64
    a, b = a.astype(dtype, copy=False).reshape(-1, 4), b.astype(dtype, copy=False).reshape(-1, 4)
    # Outer min/max per coordinate, in place: no [N, M, 2] temporaries.
    iw = np.minimum.outer(a[:, 2], b[:, 2])
    iw -= np.maximum.outer(a[:, 0], b[:, 0])
    ih = np.minimum.outer(a[:, 3], b[:, 3])
    ih -= np.maximum.outer(a[:, 1], b[:, 1])
    inter = np.maximum(iw, 0, out=iw)
    inter *= np.maximum(ih, 0, out=ih)
    area_a = np.maximum(a[:, 2] - a[:, 0], 0) * np.maximum(a[:, 3] - a[:, 1], 0)
    area_b = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
    return inter, area_a, area_b
