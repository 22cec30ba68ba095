"""The one record every dataset reader yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dip_r1.boxes import empty_boxes


@dataclass
class DetectionSample:
    """One annotated image, in pixels of the original image.

    Readers build these from annotation files alone: the image is never opened here.
    """

    image_id: str
    """A name unique within the dataset."""
    image_path: Path
    """Where the image file lies."""
    width: int
    """Width of the original image in pixels (0 when the annotation does not say)."""
    height: int
    """Height of the original image in pixels (0 when the annotation does not say)."""
    boxes: Tensor = field(default_factory=empty_boxes)
    """``Tensor[N, 4]`` float32 xyxy target boxes."""
    labels: list[str] = field(default_factory=list)
    """One category name per target box."""
    ignore: Tensor = field(default_factory=empty_boxes)
    """``Tensor[M, 4]`` float32 xyxy ignore regions (crowds, masks, out-of-setting objects)."""

    def __post_init__(self) -> None:
        self.image_path = Path(self.image_path)
        self.boxes = torch.as_tensor(self.boxes, dtype=torch.float32).reshape(-1, 4)
        self.ignore = torch.as_tensor(self.ignore, dtype=torch.float32).reshape(-1, 4)
        if len(self.labels) != len(self.boxes):
            raise ValueError(f"{self.image_id}: {len(self.boxes)} boxes but {len(self.labels)} labels")
