"""From a sample and its image to chat messages, a resized image and targets in the model's coordinates.

Two coordinate conventions exist among the supported model families:

- ``"absolute"``: pixels of the image the model sees, i.e. after the processor's resize (Qwen2.5-VL);
- ``"relative-1000"``: 0..1000 along each axis of the image (Qwen2-VL, Qwen3-VL).

The image is resized here with Qwen's ``smart_resize`` rule, so the processor leaves it as it is and
"pixels of the resized image" are known exactly.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor

from dip_r1.data.sample import DetectionSample

Coordinates = Literal["absolute", "relative-1000"]
COORDINATES = ("absolute", "relative-1000")

QWEN_MIN_PIXELS = 56 * 56
"""Qwen2-VL / Qwen2.5-VL image processor default lower pixel bound."""
QWEN_MAX_PIXELS = 28 * 28 * 1280
"""Qwen2-VL / Qwen2.5-VL image processor default upper pixel bound."""

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful visual perception assistant for crowded scenes. "
    "Answer with exactly three blocks, in this order, and nothing else:\n"
    "<think>...</think>\n"
    "<look>[[x1, y1, x2, y2], ...]</look>\n"
    '<answer>[{"bbox_2d": [x1, y1, x2, y2], "label": "person"}, ...]</answer>\n'
    "In <think>, reason briefly about the scene: where the objects are, which ones are occluded, small "
    "or hard to tell apart. In <look>, list the regions you are least sure about, as boxes to inspect "
    "closely. In <answer>, give exactly one box per object. Every box is [x1, y1, x2, y2]: the top-left "
    "and bottom-right corners, as integers."
)
"""System prompt explaining the Think-Look-Answer format."""

DEFAULT_USER_PROMPT = "Detect every {category} in the image. Give each box {coordinates}."
"""User prompt template; fields: ``{category}``, ``{coordinates}``, ``{width}``, ``{height}``."""

_COORDINATE_TEXT = {
    "absolute": "in pixels of this {width}x{height} image",
    "relative-1000": "on a 0 to 1000 scale of the image width and height",
}


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL's resize rule: ``(height, width)`` multiples of ``factor`` with a pixel count in range.

    Each side is rounded to the nearest multiple of ``factor``; if the area is then outside
    ``[min_pixels, max_pixels]`` both sides are scaled by the same factor (aspect ratio kept).

    >>> smart_resize(480, 640)
    (476, 644)
    >>> smart_resize(1080, 1920)
    (728, 1316)
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _scale(orig_size: Sequence[int], resized_size: Sequence[int], coordinates: str) -> Tensor:
    """Per-coordinate factors ``[sx, sy, sx, sy]`` from original pixels to model coordinates."""
    if coordinates not in COORDINATES:
        raise ValueError(f"coordinates must be one of {COORDINATES}, got {coordinates!r}")
    target = resized_size if coordinates == "absolute" else (1000, 1000)
    sx, sy = target[0] / orig_size[0], target[1] / orig_size[1]
    return torch.tensor([sx, sy, sx, sy], dtype=torch.float64)


def to_model_coords(
    boxes: Tensor, orig_size: Sequence[int], resized_size: Sequence[int], coordinates: str
) -> Tensor:
    """Boxes in original pixels -> the model's coordinate space (float32, not rounded).

    Sizes are ``(width, height)``; ``resized_size`` is only used for ``"absolute"``.

    >>> b = torch.tensor([[64.0, 48.0, 320.0, 240.0]])
    >>> to_model_coords(b, (640, 480), (644, 476), "relative-1000").tolist()
    [[100.0, 100.0, 500.0, 500.0]]
    """
    scale = _scale(orig_size, resized_size, coordinates)
    return (boxes.to(torch.float64) * scale).to(torch.float32).reshape(-1, 4)


def to_image_coords(
    boxes: Tensor, orig_size: Sequence[int], resized_size: Sequence[int], coordinates: str
) -> Tensor:
    """The inverse of :func:`to_model_coords`: model coordinates -> original pixels (float32)."""
    scale = _scale(orig_size, resized_size, coordinates)
    return (boxes.to(torch.float64) / scale).to(torch.float32).reshape(-1, 4)


def format_boxes(boxes: Tensor) -> str:
    """Boxes as the ``<look>`` text: integers, ``[[x1, y1, x2, y2], ...]``.

    >>> format_boxes(torch.tensor([[1.4, 2.6, 10.0, 20.5]]))
    '[[1, 3, 10, 20]]'
    """
    return json.dumps(torch.round(boxes.reshape(-1, 4)).to(torch.int64).tolist())


def format_answer(boxes: Tensor, labels: Sequence[str], regions: Sequence[int | None] | None = None) -> str:
    """Boxes and labels as the ``<answer>`` JSON, coordinates rounded to integers; an object whose ``regions``
    entry is not None names the crop its box is read off (zoom look), before its box, so that a model writing
    it left to right chooses the frame before the numbers.

    >>> format_answer(torch.tensor([[1.4, 2.6, 10.0, 20.0]]), ["person"])
    '[{"bbox_2d": [1, 3, 10, 20], "label": "person"}]'
    >>> format_answer(torch.tensor([[1.0, 2, 3, 4], [5.0, 6, 7, 8]]), ["person"] * 2, [2, None])
    '[{"region": 2, "bbox_2d": [1, 2, 3, 4], "label": "person"}, {"bbox_2d": [5, 6, 7, 8], "label": "person"}]'
    """
    rows = torch.round(boxes.reshape(-1, 4)).to(torch.int64).tolist()
    regions = [None] * len(rows) if regions is None else regions
    return json.dumps(
        [
            ({} if region is None else {"region": region}) | {"bbox_2d": row, "label": label}
            for row, label, region in zip(rows, labels, regions, strict=True)
        ]
    )


def format_completion(
    think: str,
    look: Tensor,
    boxes: Tensor,
    labels: Sequence[str],
    regions: Sequence[int | None] | None = None,
) -> str:
    """A whole Think-Look-Answer completion: the grammar :func:`dip_r1.rewards.parse_completion` reads
    (``regions``: :func:`format_answer`'s).

    >>> print(format_completion("1 person.", torch.zeros(0, 4), torch.tensor([[1.0, 2, 3, 4]]), ["person"]))
    <think>1 person.</think>
    <look>[]</look>
    <answer>[{"bbox_2d": [1, 2, 3, 4], "label": "person"}]</answer>
    """
    answer = format_answer(boxes, labels, regions)
    return f"<think>{think}</think>\n<look>{format_boxes(look)}</look>\n<answer>{answer}</answer>"


@dataclass
class Prompt:
    """One model input before tokenisation."""

    messages: list[dict[str, Any]]
    """Chat messages in Hugging Face format (system turn, user turn with an image placeholder)."""
    image: Image.Image
    """The RGB image, already resized to what the processor will keep."""
    target: dict[str, Any]
    """Ground truth in the model's coordinates: ``boxes``, ``ignore``, ``labels``, ``image_size``,
    ``orig_size``, ``resized_size``, ``coordinates``, ``category``, ``image_id``, ``image_path`` (the source
    file), ``dataset``, ``resize``."""
    source: Image.Image | None = None
    """The decoded original image, kept when the zoom look will cut crops from it."""


class DetectionPromptBuilder:
    """Turns a :class:`DetectionSample` and its decoded image into a :class:`Prompt`."""

    def __init__(
        self,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        user_prompt: str = DEFAULT_USER_PROMPT,
        category: str | None = None,
        coordinates: Coordinates = "absolute",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        factor: int = 28,
    ) -> None:
        """
        Args:
            system_prompt: The system turn; explains the Think-Look-Answer format.
            user_prompt: The user turn's text, a template with ``{category}``, ``{coordinates}`` (how
                boxes are expressed), ``{width}`` and ``{height}`` (of the coordinate space).
            category: The category named in the prompt; only boxes with this label are targets.
                None: each sample's most common label, or "person" when it has none.
            coordinates: The model's box convention: "absolute" (pixels of the resized image,
                Qwen2.5-VL) or "relative-1000" (Qwen2-VL, Qwen3-VL). The model's `connect` sets it.
            min_pixels: Lower bound on the resized image's pixel count (None: the processor's, else 56*56).
            max_pixels: Upper bound on the resized image's pixel count (None: the processor's, else
                28*28*1280). Lower it to save memory and time.
            factor: Both sides of the resized image are multiples of this (patch size x merge size).
        """
        if coordinates not in COORDINATES:
            raise ValueError(f"coordinates must be one of {COORDINATES}, got {coordinates!r}")
        self.system_prompt = system_prompt
        self.user_prompt = user_prompt
        self.category = category
        self.coordinates: str = coordinates
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.factor = factor
        self.keep_source = False
        """Keep the decoded original in :attr:`Prompt.source` (the zoom look cuts its crops from it); the model
        says so when it connects."""
        self._warned_category = False

    def configure(
        self,
        *,
        coordinates: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        factor: int | None = None,
        image_processor: Any = None,
        keep_source: bool | None = None,
    ) -> None:
        """Take the model family's settings; given values win, unset pixel limits come from the processor."""
        if keep_source is not None:
            self.keep_source = keep_source
        if coordinates is not None:
            if coordinates not in COORDINATES:
                raise ValueError(f"coordinates must be one of {COORDINATES}, got {coordinates!r}")
            self.coordinates = coordinates
        self.min_pixels = min_pixels if min_pixels is not None else self.min_pixels
        self.max_pixels = max_pixels if max_pixels is not None else self.max_pixels
        self.factor = factor if factor is not None else self.factor
        if image_processor is not None:
            # The processor would resize again if our limits were looser than its own.
            size = getattr(image_processor, "size", None) or {}
            lo = _first(size.get("shortest_edge"), getattr(image_processor, "min_pixels", None))
            hi = _first(size.get("longest_edge"), getattr(image_processor, "max_pixels", None))
            if self.min_pixels is None and lo is not None:
                self.min_pixels = int(lo)
            if self.max_pixels is None and hi is not None:
                self.max_pixels = int(hi)
            patch, merge = (
                getattr(image_processor, "patch_size", None),
                getattr(image_processor, "merge_size", None),
            )
            if factor is None and isinstance(patch, int) and isinstance(merge, int):
                self.factor = patch * merge

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` the image is resized to."""
        h, w = smart_resize(height, width, *self.resize_rule())
        return w, h

    def category_of(self, sample: DetectionSample) -> str:
        """The category the prompt names for this sample."""
        if self.category is not None:
            return self.category
        if sample.labels:
            return Counter(sample.labels).most_common(1)[0][0]
        return "person"

    def build(self, sample: DetectionSample, image: Image.Image, dataset: str = "") -> Prompt:
        """Messages, resized image and target for one sample; ``image`` is the decoded original."""
        source = image if self.keep_source else None
        orig = image.size
        resized = self.resized_size(*orig)
        if resized != orig:
            image = image.resize(resized, Image.Resampling.BICUBIC)
        category = self.category_of(sample)
        keep = [i for i, label in enumerate(sample.labels) if label == category]
        if sample.labels and not keep and not self._warned_category:
            self._warned_category = True
            warnings.warn(
                f"category {category!r} matches no label of {sample.image_id} "
                f"(labels: {sorted(set(sample.labels))}): it has no target box",
                stacklevel=2,
            )
        space = resized if self.coordinates == "absolute" else (1000, 1000)
        coordinate_text = _COORDINATE_TEXT[self.coordinates].format(width=space[0], height=space[1])
        text = self.user_prompt.format(
            category=category, coordinates=coordinate_text, width=space[0], height=space[1]
        )
        messages = [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
        ]
        target = {
            "boxes": to_model_coords(sample.boxes[keep], orig, resized, self.coordinates),
            "ignore": to_model_coords(sample.ignore, orig, resized, self.coordinates),
            "labels": [sample.labels[i] for i in keep],
            "image_size": space,
            "orig_size": orig,
            "resized_size": resized,
            "coordinates": self.coordinates,
            "category": category,
            "image_id": sample.image_id,
            "image_path": str(sample.image_path),
            "dataset": dataset,
            "resize": self.resize_rule(),
        }
        return Prompt(messages=messages, image=image, target=target, source=source)

    def resize_rule(self) -> tuple[int, int, int]:
        """``(factor, min_pixels, max_pixels)`` of :func:`smart_resize` for this builder's images (a zoom crop is
        shown within the same budget unless told otherwise)."""
        return (
            self.factor,
            self.min_pixels if self.min_pixels is not None else QWEN_MIN_PIXELS,
            self.max_pixels if self.max_pixels is not None else QWEN_MAX_PIXELS,
        )


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)
