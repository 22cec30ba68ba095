"""CrowdHuman reader: ``.odgt`` files, one JSON object a line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dip_r1.data.sample import DetectionSample
from dip_r1.data.sources.base import BadInput, SourceMixin, parse_box

BOX_KEYS = {"full": "fbox", "visible": "vbox", "head": "hbox"}


class CrowdHuman(SourceMixin):
    """CrowdHuman annotations, read line by line from an ``.odgt`` file.

    A line is ``{"ID": ..., "gtboxes": [{"tag": "person" | "mask", "fbox" | "vbox" | "hbox":
    [x, y, w, h], "extra": {"ignore": 0 | 1, ...}, "head_attr": {...}}]}``. Persons are labelled
    ``"person"``; ``tag == "mask"`` and ``extra.ignore == 1`` (and, for head boxes,
    ``head_attr.ignore == 1``) become ignore regions. The format has no image size: samples have
    ``width == height == 0`` and boxes are clipped once the dataset opens the image.

    Args:
        annotation_file: the ``.odgt`` file (e.g. ``annotation_train.odgt``).
        image_dir: the folder holding ``<ID>.jpg``.
        box: which box is the target: ``"full"`` (fbox), ``"visible"`` (vbox) or ``"head"`` (hbox).
        strict: raise ``ValueError`` on bad input instead of skipping, counting and warning.
        name: dataset name for per-dataset metrics (default ``"crowdhuman"``).
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        box: str = "full",
        strict: bool = False,
        name: str | None = None,
    ) -> None:
        if box not in BOX_KEYS:
            raise ValueError(f"box must be one of {sorted(BOX_KEYS)}, got {box!r}")
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.box = box
        self._init_source(name, strict)

    def __iter__(self) -> Iterator[DetectionSample]:
        return self._json_lines(self.annotation_file, self._sample)

    def _sample(self, record: dict, location: str) -> DetectionSample:
        image_id = record.get("ID")
        gtboxes = record.get("gtboxes", [])
        if not isinstance(image_id, str) or not image_id:
            raise BadInput("malformed_line", "missing or empty 'ID'")
        if not isinstance(gtboxes, list):
            raise BadInput("malformed_line", "'gtboxes' is not a list")
        key = BOX_KEYS[self.box]
        boxes, labels, ignore = [], [], []
        for index, gt in enumerate(gtboxes):
            try:
                box, is_target = self._gtbox(gt, key)
            except BadInput as error:
                self._skip(error.kind, location, f"gtboxes[{index}]: {error.reason}")
                continue
            if is_target:
                boxes.append(box)
                labels.append("person")
            else:
                ignore.append(box)
        boxes_t, labels = self._targets(boxes, labels, location, xywh=True)
        return DetectionSample(
            image_id=image_id,
            image_path=self.image_dir / f"{image_id}.jpg",
            width=0,
            height=0,
            boxes=boxes_t,
            labels=labels,
            ignore=self._regions(ignore, location, xywh=True),
        )

    @staticmethod
    def _gtbox(gt: object, key: str) -> tuple[list[float], bool]:
        """One ``gtboxes`` entry -> (xywh box, is a target)."""
        if not isinstance(gt, dict):
            raise BadInput("malformed_box", f"expected an object, got {gt!r}")
        tag = gt.get("tag")
        if tag not in ("person", "mask"):
            raise BadInput("unknown_label", f"unknown tag {tag!r}")
        # Masks are often annotated with an fbox only: fall back to it for the region.
        values = gt.get(key, gt.get("fbox")) if tag == "mask" else gt.get(key)
        if values is None:
            raise BadInput("malformed_box", f"missing {key!r}")
        box = parse_box(values)
        extra = gt.get("extra") if isinstance(gt.get("extra"), dict) else {}
        head_attr = gt.get("head_attr") if isinstance(gt.get("head_attr"), dict) else {}
        ignored = tag == "mask" or extra.get("ignore", 0) == 1
        if key == "hbox":
            ignored = ignored or head_attr.get("ignore", 0) == 1
        return box, not ignored
