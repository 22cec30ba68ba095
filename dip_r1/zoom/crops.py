"""Opening crops during a rollout: which regions, their pixels for the vision encoder, their tokens.

:class:`Zoom` holds what the rollout of one batch needs to open a completion's crops: the source images and
targets of its prompts, the processor's image processor, and the zoom settings. The rollout asks it, once per
completion that closed ``</look>``, for the crops of that completion's look boxes (:meth:`Zoom.open`), their
patches (:meth:`Zoom.pixels`) and the token ids that stand for them in the sequence (:meth:`Zoom.tokens`).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image
from torch import Tensor

from dip_r1.config import SamplingConfig
from dip_r1.rewards.parsing import parse_completion
from dip_r1.tokens import TokenIds
from dip_r1.zoom.geometry import CropGeometry, crop_regions

LOOK_CLOSED = "</look>"


_GT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokens_with_gt(tokenizer: Any) -> frozenset[int]:
    """The ids whose token spells a ``>`` (byte-level BPE and sentencepiece keep ASCII as it is), once per
    tokenizer."""
    if tokenizer not in _GT:
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        _GT[tokenizer] = frozenset(i for i, t in enumerate(vocab) if t is not None and ">" in t)
    return _GT[tokenizer]


class Zoom:
    """The crops of one batch's completions (one per prompt: ``sources[i]``, ``targets[i]``)."""

    def __init__(
        self,
        sources: Sequence[Image.Image],
        targets: Sequence[dict[str, Any]],
        processor: Any,
        sampling: SamplingConfig,
        tokens: TokenIds,
    ) -> None:
        """
        Args:
            sources: The decoded original of each prompt's image (``batch["sources"]``).
            targets: Each prompt's target: ``orig_size``, ``resized_size``, ``coordinates``, ``resize``.
            processor: The model's processor (its ``image_processor`` and ``tokenizer``).
            sampling: ``max_looks``, ``zoom_min_side`` and ``zoom_max_pixels``.
            tokens: The family's image tokens (``tokens.image``).
        """
        if tokens.image is None:
            raise ValueError(
                "the zoom look needs the model's image tokens (vision start, image pad, vision end)"
            )
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} source images for {len(targets)} prompts")
        self.sources, self.targets = list(sources), list(targets)
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.sampling = sampling
        self.tokens = tokens
        self.merge = int(getattr(self.image_processor, "merge_size", 2))
        self.processor_max_pixels = processor_max_pixels(self.image_processor)
        self._gt = _tokens_with_gt(self.tokenizer)

    def spells_gt(self, token: int) -> bool:
        """Whether a token's text holds a ``>`` (only then can it close ``</look>``)."""
        return token in self._gt

    def max_block_tokens(self) -> int:
        """The most tokens the crops of one completion take (every prompt's budget, ``max_looks`` crops)."""
        most = 0
        for prompt, target in enumerate(self.targets):
            factor = target["resize"][0]
            most = max(most, self.sampling.max_looks * (self._budget(prompt) // factor**2 + 2))
        return most

    def _budget(self, prompt: int) -> int:
        """A crop's pixels: ``zoom_max_pixels`` (None: the prompt's budget), at most what the image processor
        takes without reducing the crop again (its ``max_pixels``), so that the shown size is the encoded one."""
        budget = self.sampling.zoom_max_pixels or self.targets[prompt]["resize"][2]
        return min(budget, self.processor_max_pixels or budget)

    def closed_look(self, ids: Sequence[int]) -> bool:
        """Whether a completion's tokens so far (its last few suffice) spell ``</look>``."""
        return LOOK_CLOSED in self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def crop_settings(self, prompt: int) -> dict[str, Any]:
        """How prompt ``prompt``'s crops are opened: ``max_looks``, ``min_side`` and the resize of a crop
        (``factor``, ``min_pixels``, ``max_pixels``: ``zoom_max_pixels`` or the prompt's, within the image
        processor's)."""
        factor, min_pixels, _ = self.targets[prompt]["resize"]
        budget = self._budget(prompt)
        return {
            "max_looks": self.sampling.max_looks,
            "min_side": self.sampling.zoom_min_side,
            "factor": factor,
            "min_pixels": min(min_pixels, budget),
            "max_pixels": budget,
        }

    def open(self, prompt: int, ids: Sequence[int]) -> list[CropGeometry]:
        """The crops that the completion ``ids`` (of prompt ``prompt``, up to its ``</look>``) opens."""
        look = parse_completion(self.tokenizer.decode(list(ids), skip_special_tokens=True)).look
        return crop_regions(look, self.targets[prompt], **self.crop_settings(prompt))

    def pixels(self, prompt: int, crops: Sequence[CropGeometry]) -> tuple[Tensor, Tensor]:
        """``(pixel_values, image_grid_thw)`` of the crops, cut from the source image and resized to their
        shown size (the image processor then leaves the size as it is)."""
        source = self.sources[prompt]
        images = [source.crop(c.box).resize(c.size, Image.Resampling.BICUBIC) for c in crops]
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def tokens_for(self, grid_thw: Tensor) -> list[int]:
        """The ids of the crops in the sequence: vision start, one image pad per merged patch, vision end each."""
        start, pad, end = self.tokens.image
        ids: list[int] = []
        for t, h, w in grid_thw.tolist():
            ids += [start] + [pad] * (t * h * w // self.merge**2) + [end]
        return ids


def processor_max_pixels(image_processor: Any) -> int | None:
    """The most pixels the image processor keeps before reducing an image (``max_pixels``, or its ``size``'s
    ``longest_edge`` as the Qwen-VL processors of transformers 5 name it); None when it does not say."""
    value = getattr(image_processor, "max_pixels", None)
    if value is None:
        size = getattr(image_processor, "size", None)
        value = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    return int(value) if value else None


def zoom_of(
    batch: Mapping[str, Any], processor: Any, sampling: SamplingConfig, tokens: TokenIds
) -> Zoom | None:
    """The :class:`Zoom` of a collated batch when ``sampling`` zooms, else None; one line when the batch lacks
    the source images (the model did not ask the data for them)."""
    if sampling.look_mode != "zoom":
        return None
    if "sources" not in batch:
        raise ValueError(
            "look_mode 'zoom' needs the source images in the batch: connect the DataModule with the model's "
            "data_spec() (keep_source)"
        )
    return Zoom(batch["sources"], batch["targets"], processor, sampling, tokens)
