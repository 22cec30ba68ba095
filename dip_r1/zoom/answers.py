"""Boxes read off a crop, back in the image frame: what every reward and metric reads.

An answer object with ``"region": k`` gives its box in the frame of the ``k``-th crop the completion was shown
(:class:`~dip_r1.zoom.geometry.CropGeometry`); :func:`resolve_regions` maps it to the image frame once, right
after parsing, so no reward converts. A ``region`` that names no crop (0, -1, 99, ``"1"``, or any ``region`` in
text mode, where no crop is shown) drops its box and makes the completion not well-formed: the format reward
counts it as a format error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from dip_r1.boxes import valid_boxes
from dip_r1.rewards.parsing import ParsedCompletion
from dip_r1.zoom.geometry import CropGeometry


def resolve_regions(parsed: ParsedCompletion, crops: Sequence[CropGeometry]) -> ParsedCompletion:
    """A new record whose ``answer`` boxes are all in the image frame; ``parsed`` is left as it is.

    A box with ``region`` ``k`` in ``1..len(crops)`` is mapped with ``crops[k - 1].to_image``; one whose region
    names no crop is dropped (with its label, span and region) and the record is then not ``well_formed``. A
    mapped box that overflows float32 is dropped too, as the parser drops one (not a format error). ``regions``
    stays aligned with the rows, so a picture can tell which crop each box was read off. Without any region the
    record is returned as it is.

    >>> from dip_r1.rewards.parsing import parse_completion
    >>> crop = CropGeometry(box=(100.0, 50.0, 300.0, 150.0), size=(64, 32), coordinates="relative-1000",
    ...                     orig_size=(400, 200), resized_size=(160, 80))
    >>> p = parse_completion('<think>x</think><look>[[250, 250, 750, 750]]</look><answer>['
    ...     '{"region": 1, "bbox_2d": [250, 500, 750, 1000]}, {"bbox_2d": [0, 0, 10, 10]}, '
    ...     '{"region": 2, "bbox_2d": [0, 0, 10, 10]}]</answer>')
    >>> r = resolve_regions(p, [crop])
    >>> r.answer.tolist(), r.regions, r.well_formed, p.well_formed
    ([[375.0, 500.0, 625.0, 750.0], [0.0, 0.0, 10.0, 10.0]], [1, None], False, True)
    """
    regions = parsed.regions
    if parsed.answer is None or not regions or all(r is None for r in regions):
        return parsed
    answer = parsed.answer.clone()
    named = [r is None or 1 <= r <= len(crops) for r in regions]
    for k in sorted({r for r in regions if r is not None and 1 <= r <= len(crops)}):
        rows = [i for i, r in enumerate(regions) if r == k]
        answer[rows] = crops[k - 1].to_image(answer[rows])
    keep = torch.tensor(named, dtype=torch.bool) & valid_boxes(answer)
    if bool(keep.all()):
        return dataclasses.replace(parsed, answer=answer)
    kept = keep.tolist()

    def rows_of(values: list | None) -> list | None:
        return [v for v, k in zip(values, kept) if k] if values is not None else None

    return dataclasses.replace(
        parsed,
        answer=answer[keep],
        labels=rows_of(parsed.labels),
        answer_spans=rows_of(parsed.answer_spans),
        regions=rows_of(regions),
        well_formed=parsed.well_formed and all(named),
    )
