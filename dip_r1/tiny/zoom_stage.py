"""The zoom stage of :mod:`dip_r1.tiny.pretrain`: a batch's targets as zoom teacher completions, laid out with
their crops for teacher forcing, and the grounding targets of the crops."""

from __future__ import annotations

import random

import torch

from dip_r1.config import SamplingConfig
from dip_r1.tokens import TokenIds
from dip_r1.zoom.crops import Zoom
from dip_r1.zoom.geometry import CropGeometry
from dip_r1.zoom.teacher import TeacherBatch, teacher_batch, zoom_targets


class ZoomTeacher:
    """The zoom stage's targets: each batch's as zoom teacher completions (a ``text_share`` of them in the text
    look), laid out with their crops for teacher forcing (:mod:`dip_r1.zoom.teacher`)."""

    def __init__(
        self,
        processor,
        model,
        seed: int,
        text_share: float,
        max_looks: int,
        zoom_max_pixels: int | None = None,
    ) -> None:
        self.processor, self.text_share = processor, text_share
        self.sampling = SamplingConfig(look_mode="zoom", max_looks=max_looks, zoom_max_pixels=zoom_max_pixels)
        self.tokens = TokenIds.of(model, processor)
        self.rng = random.Random(seed)

    def __call__(self, batch: dict) -> tuple[TeacherBatch, list[dict]]:
        """``(teacher, grounding)``: the :class:`~dip_r1.zoom.teacher.TeacherBatch` and, for each of its images
        in order (a prompt's, then its crops'), the grounding target (:func:`crop_grounding_target`)."""
        zoom = Zoom(batch["sources"], batch["targets"], self.processor, self.sampling, self.tokens)
        written, grounding = [], []
        for target, zoomed in zip(batch["targets"], zoom_targets(zoom, self.rng)):
            text = self.rng.random() < self.text_share
            written.append(zoomed.text_look if text else zoomed)  # the same look; crops or not after it
            grounding += [target] + ([] if text else [crop_grounding_target(target, c) for c in zoomed.crops])
        eos = self.processor.tokenizer.eos_token_id
        return teacher_batch(zoom, batch["inputs"], written, eos), grounding


def crop_grounding_target(target: dict, crop: CropGeometry) -> dict:
    """The grounding target of a crop (:func:`dip_r1.tiny.grounding.cell_targets`): the people whose centre it
    holds, in its frame.

    >>> crop = CropGeometry((0.0, 0.0, 100.0, 100.0), (64, 64), "relative-1000", (200, 100), (200, 100))
    >>> t = {"boxes": torch.tensor([[0.0, 0, 250, 500], [400, 0, 600, 1000]]), "coordinates": "relative-1000"}
    >>> crop_grounding_target(t, crop)["boxes"].tolist()  # the second person's centre lies outside the crop
    [[0.0, 0.0, 500.0, 500.0]]
    """
    boxes = crop.from_image(torch.as_tensor(target["boxes"]).float().reshape(-1, 4).cpu())
    w, h = crop.space
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    return {"boxes": boxes[inside], "image_size": (w, h)}
