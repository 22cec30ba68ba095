"""WIDER Pedestrian (challenge) reader: one line an image, ``name`` then ``label x y w h`` groups."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dip_r1.data.sample import DetectionSample
from dip_r1.data.sources.base import BadInput, SourceMixin, parse_box, parse_groups, read_lines, where

LABELS = {1: "pedestrian", 2: "cyclist"}
"""WIDER Pedestrian label id -> category name."""


class WiderPedestrian(SourceMixin):
    """WIDER Pedestrian challenge annotations, read line by line.

    An annotation line is ``<image name> <label> <x> <y> <w> <h> [<label> <x> <y> <w> <h> ...]``
    (label 1 ``"pedestrian"``, 2 ``"cyclist"``); an ignore-file line is ``<image name> <x> <y> <w>
    <h> ...``. The ignore file is read whole when iteration starts (one short line per image with
    ignore regions); the annotation file is streamed. The format has no image size: samples have
    ``width == height == 0`` and boxes are clipped once the dataset opens the image.

    Args:
        annotation_file: the annotation text file (e.g. ``train_annotations.txt``).
        image_dir: the folder the image names are relative to.
        ignore_file: the optional ignore-region file of the same split.
        strict: raise ``ValueError`` on bad input instead of skipping, counting and warning.
        name: dataset name for per-dataset metrics (default ``"widerpedestrian"``).
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        ignore_file: str | Path | None = None,
        strict: bool = False,
        name: str | None = None,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.ignore_file = Path(ignore_file) if ignore_file is not None else None
        self._init_source(name, strict)

    def _read_ignore(self) -> dict[str, list[tuple[list[float], str]]]:
        """Image name -> [(xywh region, location)] from the ignore file."""
        regions: dict[str, list[tuple[list[float], str]]] = {}
        if self.ignore_file is None:
            return regions
        for number, line in read_lines(self.ignore_file):
            location = where(self.ignore_file, number)
            image, *fields = line.split()
            try:
                boxes = [parse_box(group) for group in parse_groups(fields, 4, "x y w h")]
            except BadInput as error:
                self._skip_bad(error, location)
                continue
            regions.setdefault(image, []).extend((box, location) for box in boxes)
        return regions

    def __iter__(self) -> Iterator[DetectionSample]:
        ignore = self._read_ignore()
        for number, line in read_lines(self.annotation_file):
            location = where(self.annotation_file, number)
            image, *fields = line.split()
            try:
                groups = parse_groups(fields, 5, "label x y w h")
            except BadInput as error:
                self._skip_bad(error, location)
                continue
            boxes, labels = [], []
            for label, *box in groups:
                try:
                    if label not in LABELS:
                        raise BadInput("unknown_label", f"unknown label id {label:g}")
                    boxes.append(parse_box(box))
                except BadInput as error:
                    self._skip_bad(error, location)
                    continue
                labels.append(LABELS[int(label)])
            boxes_t, labels = self._targets(boxes, labels, location, xywh=True)
            regions = ignore.get(image, [])
            regions_t = self._regions([box for box, _ in regions], [at for _, at in regions], xywh=True)
            yield DetectionSample(
                image_id=Path(image).stem,
                image_path=self.image_dir / image,
                width=0,
                height=0,
                boxes=boxes_t,
                labels=labels,
                ignore=regions_t,
            )
