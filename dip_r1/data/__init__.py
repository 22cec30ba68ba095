"""Detection data: samples, dataset readers, prompts and the DataModule."""

from dip_r1.data.images import ImageFolder
from dip_r1.data.module import DetectionCollate, DetectionDataModule
from dip_r1.data.prompts import (
    DetectionPromptBuilder,
    Prompt,
    format_answer,
    format_completion,
    format_boxes,
    smart_resize,
    to_image_coords,
    to_model_coords,
)
from dip_r1.data.sample import DetectionSample
from dip_r1.data.stream import DetectionSource, DetectionStream

__all__ = [
    "DetectionCollate",
    "DetectionDataModule",
    "DetectionPromptBuilder",
    "DetectionSample",
    "DetectionSource",
    "DetectionStream",
    "ImageFolder",
    "Prompt",
    "format_answer",
    "format_completion",
    "format_boxes",
    "smart_resize",
    "to_image_coords",
    "to_model_coords",
]
