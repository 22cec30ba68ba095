"""Bad-input handling shared by every dataset reader.

Readers mix in :class:`SourceMixin`: it owns the ``name``, ``strict`` and ``skipped`` attributes and
the one place that decides what happens to a malformed record, an empty box or an unknown label:
skipped, counted in ``skipped`` and reported with :func:`warnings.warn`; with ``strict=True``, a
:class:`~dip_r1.preflight.InputError` (a ``ValueError``) naming the file and line instead. Training never stops on lenient bad input.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from dip_r1.boxes import clip_boxes, empty_boxes, valid_boxes, xywh_to_xyxy
from dip_r1.data.sample import DetectionSample
from dip_r1.preflight import InputError


class BadInput(ValueError):
    """A record a reader cannot use; raised inside readers and turned into a skip or an error."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def where(path: str | Path, line: int | str) -> str:
    """A location for messages: ``file:line`` for line numbers, ``file (what)`` otherwise.

    >>> where("a/b.odgt", 3)
    'a/b.odgt:3'
    >>> where("anno_val.mat", "cell 2")
    'anno_val.mat (cell 2)'
    """
    return f"{path}:{line}" if isinstance(line, int) else f"{path} ({line})"


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, stripped_line)`` for the non-blank lines of a text file, lazily."""
    with open(path, encoding="utf-8-sig") as handle:  # a byte order mark is no part of the data
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if line:
                yield number, line


def parse_json(line: str) -> dict:
    """Parse one JSON object; anything else raises :class:`BadInput` ``malformed_line``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadInput("malformed_line", f"not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise BadInput("malformed_line", f"expected a JSON object, got {type(record).__name__}")
    return record


def parse_box(values: object) -> list[float]:
    """Four finite numbers as a list of floats (``[x1, y1, x2, y2]`` or ``[x, y, w, h]``, as given).

    >>> parse_box([1, 2, "3", 4.5])
    [1.0, 2.0, 3.0, 4.5]
    >>> parse_box([1, 2, float("nan"), 4])
    Traceback (most recent call last):
    ...
    dip_r1.data.sources.base.BadInput: a box must be 4 finite numbers, got [1, 2, nan, 4]
    """
    # Checked in the cheapest order: this runs once per box of every dataset.
    if type(values) not in (list, tuple) and (isinstance(values, str) or not isinstance(values, Sequence)):
        raise BadInput("malformed_box", f"a box must be 4 numbers, got {values!r}")
    if len(values) != 4:
        raise BadInput("malformed_box", f"a box must be 4 numbers, got {values!r}")
    try:
        box = [float(v) for v in values]
    except (TypeError, ValueError):
        raise BadInput("malformed_box", f"a box must be 4 numbers, got {values!r}") from None
    if not math.isfinite(box[0] + box[1] + box[2] + box[3]):  # nan or inf anywhere
        raise BadInput("malformed_box", f"a box must be 4 finite numbers, got {values!r}")
    return box


def parse_numbers(fields: Sequence[str]) -> list[float]:
    """Whitespace/comma separated fields as floats, or :class:`BadInput` ``malformed_line``."""
    try:
        return [float(f) for f in fields]
    except ValueError:
        raise BadInput("malformed_line", f"expected numbers, got {' '.join(fields)!r}") from None


def parse_groups(fields: Sequence[str], size: int, layout: str) -> list[list[float]]:
    """Fields as consecutive groups of ``size`` numbers (e.g. ``label x y w h``), or :class:`BadInput`."""
    if len(fields) % size:
        raise BadInput("malformed_line", f"{len(fields)} numbers is not a multiple of {size} ({layout})")
    values = parse_numbers(fields)
    return [values[i : i + size] for i in range(0, len(values), size)]


class SourceMixin:
    """Shared state and bad-input policy of a reader (a mixin, not a base to subclass deeply).

    Call :meth:`_init_source` from ``__init__``; then report problems with :meth:`_skip` and
    turn raw boxes into clean tensors with :meth:`_clean`.
    """

    name: str
    """Short dataset name, used as the prefix of per-dataset metrics."""
    strict: bool
    """Raise on bad input instead of skipping it."""
    skipped: Counter
    """How many records or boxes were skipped, by reason (``malformed_line``, ``empty_box`` ...).

    Cumulative over iterations of this object; DataLoader workers each count in their own copy."""
    max_warnings: int = 20
    """Warnings issued per reason; later skips of that reason are only counted (no flood)."""

    def _init_source(self, name: str | None, strict: bool) -> None:
        self.name = name if name is not None else type(self).__name__.lower()
        self.strict = strict
        self.skipped = Counter()

    def _skip(self, kind: str, location: str, reason: str) -> None:
        """Count and warn about one skipped item, or raise when strict."""
        message = f"{self.name}: {location}: {reason}"
        if self.strict:
            raise InputError(f"{self.name} annotation", location, reason, "fix it, or set strict false to skip and count it")
        self.skipped[kind] += 1
        count = self.skipped[kind]
        if count < self.max_warnings:
            warnings.warn(f"{message} (skipped)", stacklevel=3)
        elif count == self.max_warnings:
            warnings.warn(f"{message} (skipped; further {kind!r} skips are only counted)", stacklevel=3)

    def _skip_bad(self, error: BadInput, location: str) -> None:
        """:meth:`_skip` for a caught :class:`BadInput`."""
        self._skip(error.kind, location, error.reason)

    def _json_lines(
        self, path: Path, build: Callable[[dict, str], DetectionSample]
    ) -> Iterator[DetectionSample]:
        """Samples built from a file of one JSON object a line; a bad line is skipped (or raises, when strict)."""
        for number, line in read_lines(path):
            location = where(path, number)
            try:
                sample = build(parse_json(line), location)
            except BadInput as error:
                self._skip_bad(error, location)
                continue
            yield sample

    def _clean(
        self,
        boxes: Sequence[Sequence[float]],
        location: str | Sequence[str],
        width: int = 0,
        height: int = 0,
        xywh: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Convert boxes to xyxy, clip them to the image when its size is known, skip those left without area.

        ``boxes`` are ``[x1, y1, x2, y2]``, or ``[x, y, w, h]`` when ``xywh``. ``location`` names
        where they come from: one string, or one per box. Returns the xyxy clipped boxes
        ``Tensor[N, 4]`` and a keep mask ``Tensor[N]`` (so that callers can filter labels
        alongside). Readers whose format has no image size pass 0: their boxes are clipped later,
        by the dataset, once the image is opened.
        """
        if len(boxes) == 0:
            return empty_boxes(), torch.zeros(0, dtype=torch.bool)
        raw = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if xywh:
            raw = xywh_to_xyxy(raw)
        sized = width > 0 and height > 0
        clipped = clip_boxes(raw, width, height) if sized else raw
        keep = valid_boxes(clipped)
        if bool(keep.all()):
            return clipped, keep
        for index in torch.nonzero(~keep).flatten().tolist():
            inside = f" inside the {width}x{height} image" if sized else ""
            box = [round(v, 2) for v in raw[index].tolist()]
            at = location if isinstance(location, str) else location[index]
            self._skip("empty_box", at, f"box {box} has no area{inside}")
        return clipped, keep

    def _targets(
        self,
        boxes: list[list[float]],
        labels: list[str],
        location: str | Sequence[str],
        width: int = 0,
        height: int = 0,
        xywh: bool = False,
    ) -> tuple[Tensor, list[str]]:
        """:meth:`_clean` for target boxes, keeping ``labels`` aligned."""
        clipped, keep = self._clean(boxes, location, width, height, xywh)
        if bool(keep.all()):
            return clipped, list(labels)
        return clipped[keep], [label for label, k in zip(labels, keep.tolist()) if k]

    def _regions(
        self,
        boxes: list[list[float]],
        location: str | Sequence[str],
        width: int = 0,
        height: int = 0,
        xywh: bool = False,
    ) -> Tensor:
        """:meth:`_clean` for ignore regions."""
        clipped, keep = self._clean(boxes, location, width, height, xywh)
        return clipped if bool(keep.all()) else clipped[keep]
