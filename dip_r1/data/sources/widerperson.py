"""WiderPerson reader: a split list and one ``Annotations/<name>.jpg.txt`` file an image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dip_r1.data.sample import DetectionSample
from dip_r1.data.sources.base import BadInput, SourceMixin, parse_box, parse_numbers, read_lines, where

LABELS = {1: "pedestrian", 2: "rider", 3: "partially-visible person"}
"""WiderPerson class id -> category name of a target."""
IGNORE_CLASSES = {4, 5}
"""Class ids that are ignore regions (4 ignore, 5 crowd)."""


class WiderPerson(SourceMixin):
    """WiderPerson annotations: ``<root>/<split>.txt`` lists image names, one a line.

    ``<root>/Annotations/<name>.jpg.txt`` holds a count, then that many ``class x1 y1 x2 y2`` lines
    (classes 1 ``"pedestrian"``, 2 ``"rider"``, 3 ``"partially-visible person"``; 4 ignore and 5 crowd
    are ignore regions); images are ``<root>/Images/<name>.jpg``. An annotation file whose count
    disagrees with its lines is skipped whole (a missing box would be punished as a false positive).
    The format has no image size: samples have ``width == height == 0`` and boxes are clipped once
    the dataset opens the image. ``len()`` is the number of names in the split list.

    Args:
        root: the WiderPerson folder (holding ``Annotations/``, ``Images/`` and the split lists).
        split: the split list to read, ``"train"`` or ``"val"`` (``<root>/<split>.txt``).
        strict: raise ``ValueError`` on bad input instead of skipping, counting and warning.
        name: dataset name for per-dataset metrics (default ``"widerperson"``).
    """

    def __init__(self, root: str | Path, split: str, strict: bool = False, name: str | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.split_file = self.root / f"{split}.txt"
        self._init_source(name, strict)

    def __len__(self) -> int:
        return sum(1 for _ in read_lines(self.split_file))

    def __iter__(self) -> Iterator[DetectionSample]:
        for number, image_name in read_lines(self.split_file):
            path = self.root / "Annotations" / f"{image_name}.jpg.txt"
            if not path.is_file():
                self._skip("missing_annotation", where(self.split_file, number), f"no annotation file {path}")
                continue
            try:
                sample = self._sample(image_name, path)
            except BadInput as error:
                self._skip_bad(error, where(path, 1))
                continue
            yield sample

    def _sample(self, image_name: str, path: Path) -> DetectionSample:
        lines = list(read_lines(path))
        if not lines:
            raise BadInput("malformed_record", "empty annotation file")
        count_line, *rows = lines
        try:
            count = int(count_line[1])
        except ValueError:
            raise BadInput(
                "malformed_record", f"first line must be the box count, got {count_line[1]!r}"
            ) from None
        if count != len(rows):
            raise BadInput("malformed_record", f"count says {count} boxes but {len(rows)} lines follow")
        boxes, labels, ignore, box_at, ignore_at = [], [], [], [], []
        for number, line in rows:
            location = where(path, number)
            try:
                values = parse_numbers(line.split())
                if len(values) != 5:
                    raise BadInput("malformed_line", f"expected 'class x1 y1 x2 y2', got {line!r}")
                cls = int(values[0]) if values[0].is_integer() else -1
                if cls not in LABELS and cls not in IGNORE_CLASSES:
                    raise BadInput("unknown_label", f"unknown class {values[0]:g}")
                box = parse_box(values[1:])
            except BadInput as error:
                self._skip_bad(error, location)
                continue
            if cls in IGNORE_CLASSES:
                ignore.append(box)
                ignore_at.append(location)
            else:
                boxes.append(box)
                labels.append(LABELS[cls])
                box_at.append(location)
        boxes_t, labels = self._targets(boxes, labels, box_at)
        return DetectionSample(
            image_id=image_name,
            image_path=self.root / "Images" / f"{image_name}.jpg",
            width=0,
            height=0,
            boxes=boxes_t,
            labels=labels,
            ignore=self._regions(ignore, ignore_at),
        )
