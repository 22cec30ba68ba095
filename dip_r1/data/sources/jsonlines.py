"""JSON Lines reader: the shortest way to bring your own detection data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dip_r1.data.sample import DetectionSample
from dip_r1.data.sources.base import BadInput, SourceMixin, parse_box


class JSONLines(SourceMixin):
    """One JSON object a line: ``{"image": "a.jpg", "boxes": [[x1, y1, x2, y2], ...], "labels": [...],
    "ignore": [[x1, y1, x2, y2], ...]}``, in pixels of the original image.

    ``labels`` may be left out (every box is then ``"object"``); ``ignore`` may be left out; optional
    ``"id"`` (default: the ``image`` string) and ``"width"`` / ``"height"`` (when given, boxes are
    clipped here; otherwise the sample has ``width == height == 0`` and boxes are clipped once the
    dataset opens the image).

    Args:
        path: the ``.jsonl`` file.
        image_root: folder that relative ``image`` paths are relative to; ``None``: the ``.jsonl`` file's folder.
        strict: raise ``ValueError`` on bad input instead of skipping, counting and warning.
        name: dataset name for per-dataset metrics (default ``"jsonlines"``).
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None = None,
        strict: bool = False,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self._init_source(name, strict)

    def __iter__(self) -> Iterator[DetectionSample]:
        return self._json_lines(self.path, self._sample)

    def _sample(self, record: dict, location: str) -> DetectionSample:
        image = record.get("image")
        raw_boxes = record.get("boxes", [])
        raw_ignore = record.get("ignore", [])
        labels = record.get("labels", ["object"] * len(raw_boxes) if isinstance(raw_boxes, list) else None)
        if not isinstance(image, str) or not image:
            raise BadInput("malformed_line", "missing or empty 'image'")
        if (
            not isinstance(raw_boxes, list)
            or not isinstance(raw_ignore, list)
            or not isinstance(labels, list)
        ):
            raise BadInput("malformed_line", "'boxes', 'labels' and 'ignore' must be lists")
        if len(labels) != len(raw_boxes):
            raise BadInput("malformed_line", f"{len(raw_boxes)} boxes but {len(labels)} labels")
        try:
            width, height = int(record.get("width", 0)), int(record.get("height", 0))
        except (TypeError, ValueError):
            raise BadInput("malformed_line", "'width' and 'height' must be integers") from None
        boxes, kept_labels = [], []
        for values, label in zip(raw_boxes, labels):
            try:
                if not isinstance(label, str) or not label:
                    raise BadInput("unknown_label", f"a label must be a non-empty string, got {label!r}")
                boxes.append(parse_box(values))
            except BadInput as error:
                self._skip_bad(error, location)
                continue
            kept_labels.append(label)
        ignore = []
        for values in raw_ignore:
            try:
                ignore.append(parse_box(values))
            except BadInput as error:
                self._skip_bad(error, location)
        boxes_t, kept_labels = self._targets(boxes, kept_labels, location, width, height)
        return DetectionSample(
            image_id=str(record.get("id", image)),
            image_path=self.image_root / image,
            width=width,
            height=height,
            boxes=boxes_t,
            labels=kept_labels,
            ignore=self._regions(ignore, location, width, height),
        )
