"""UAVDT (detection) reader: ``GT/<seq>_gt_whole.txt`` rows grouped by frame."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from dip_r1.data.sample import DetectionSample
from dip_r1.data.sources.base import BadInput, SourceMixin, parse_box, parse_numbers, read_lines, where

LABELS = {1: "car", 2: "truck", 3: "bus"}
"""UAVDT category id -> category name."""

Rows = dict[int, list[tuple[list[float], str, str]]]
"""frame -> [(xywh box, label, location)]."""


class UAVDT(SourceMixin):
    """UAVDT vehicles, one sample per annotated frame.

    ``<root>/GT/<seq>_gt_whole.txt`` rows are ``frame,target_id,left,top,width,height,out_of_view,
    occlusion,category`` (1 ``"car"``, 2 ``"truck"``, 3 ``"bus"``); ``<root>/GT/<seq>_gt_ignore.txt``
    rows (same layout) are ignore regions. Frames are ``<root>/<seq>/img<frame:06d>.jpg``. The rows of a
    sequence are not sorted by frame, so each sequence's files are read whole (sequences one at a
    time); frames are yielded in order. The format has no image size: samples have
    ``width == height == 0`` and boxes are clipped once the dataset opens the image.

    Args:
        root: the UAVDT folder holding ``GT/`` and one image folder per sequence.
        sequences: sequence names to read (e.g. ``["M0101"]``); ``None`` reads every ``GT/*_gt_whole.txt``.
        strict: raise ``ValueError`` on bad input instead of skipping, counting and warning.
        name: dataset name for per-dataset metrics (default ``"uavdt"``).
    """

    def __init__(
        self,
        root: str | Path,
        sequences: Sequence[str] | None = None,
        strict: bool = False,
        name: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.sequences = list(sequences) if sequences is not None else None
        self._init_source(name, strict)

    def sequence_names(self) -> list[str]:
        """The sequences this reader reads, in order."""
        if self.sequences is not None:
            return self.sequences
        return sorted(p.name[: -len("_gt_whole.txt")] for p in (self.root / "GT").glob("*_gt_whole.txt"))

    def __iter__(self) -> Iterator[DetectionSample]:
        for sequence in self.sequence_names():
            targets = self._read_rows(self.root / "GT" / f"{sequence}_gt_whole.txt", labelled=True)
            ignore_file = self.root / "GT" / f"{sequence}_gt_ignore.txt"
            ignore = self._read_rows(ignore_file, labelled=False) if ignore_file.is_file() else {}
            for frame in sorted(targets.keys() | ignore.keys()):
                rows, regions = targets.get(frame, []), ignore.get(frame, [])
                boxes, labels = self._targets(
                    [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], xywh=True
                )
                yield DetectionSample(
                    image_id=f"{sequence}_{frame:06d}",
                    image_path=self.root / sequence / f"img{frame:06d}.jpg",
                    width=0,
                    height=0,
                    boxes=boxes,
                    labels=labels,
                    ignore=self._regions([r[0] for r in regions], [r[2] for r in regions], xywh=True),
                )

    def _read_rows(self, path: Path, labelled: bool) -> Rows:
        """Group a GT file's rows by frame; ``labelled`` checks the category column."""
        frames: Rows = {}
        for number, line in read_lines(path):
            location = where(path, number)
            try:
                values = parse_numbers(line.split(","))
                if len(values) < 6 or (labelled and len(values) < 9):
                    raise BadInput("malformed_line", f"expected 9 comma-separated fields, got {len(values)}")
                frame = values[0]
                if not frame.is_integer() or frame < 1:
                    raise BadInput("malformed_line", f"frame must be a positive integer, got {frame:g}")
                label = ""
                if labelled:
                    if values[8] not in LABELS:
                        raise BadInput("unknown_label", f"unknown category {values[8]:g}")
                    label = LABELS[int(values[8])]
                box = parse_box(values[2:6])
            except BadInput as error:
                self._skip_bad(error, location)
                continue
            frames.setdefault(int(frame), []).append((box, label, location))
        return frames
