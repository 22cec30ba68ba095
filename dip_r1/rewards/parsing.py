"""Parse a policy completion ``<think>…</think><look>[…]</look><answer>[…]</answer>`` once.

Every reward reads the same :class:`ParsedCompletion`, so the text is parsed once per completion.
The parser never raises: whatever a policy emits becomes a (possibly empty, not well-formed) record.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import chain, islice

import numpy as np
import torch
from torch import Tensor

from dip_r1.boxes import valid_boxes

MAX_CHARS = 20_000
"""Only this many characters of a completion are read: no string can make parsing slow."""
MAX_BOXES = 512
"""At most this many boxes are read from one block."""

_NUM = r"(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|NaN|-?Infinity)"
# A bracketed group of four numbers: the fallback when a block is not valid JSON, and the span of
# each box in the text. NaN / Infinity are matched so that such a box is dropped, not skipped
# (skipping would misalign boxes, labels and spans).
_BOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]")
# Innermost bracket groups: the spans of the boxes of a valid JSON block, 3x cheaper than _BOX_RE.
_BRACKETS_RE = re.compile(r"\[[^\[\]]*\]")
_TAGS = ("think", "look", "answer")
_TAG_RE = re.compile(r"</?(?:think|look|answer)>")
# The value of a "region" key in the text of one object (the fallback's: the block is not valid JSON).
_REGION_RE = re.compile(r'"region"\s*:\s*("(?:[^"\\]|\\.)*"|[^,}\s\]]+)')

INVALID_REGION = 0
"""What :attr:`ParsedCompletion.regions` holds for a ``region`` that is not a positive integer."""


@dataclass
class ParsedCompletion:
    """One completion, parsed. Boxes are float32 xyxy in the model's coordinate space."""

    text: str
    """The completion as generated."""
    think: str | None = None
    """Content of the ``<think>`` block, stripped; None when there is none."""
    look: Tensor | None = None
    """``Tensor[L, 4]`` boxes of the ``<look>`` block; None when there is no such block."""
    answer: Tensor | None = None
    """``Tensor[N, 4]`` boxes of the ``<answer>`` block; None when there is no such block."""
    labels: list[str] | None = None
    """One label per ``answer`` row when the answer is a list of ``{"bbox_2d", "label"}`` objects."""
    well_formed: bool = False
    """Exactly the condition of :func:`dip_r1.rewards.functional.format_reward`."""
    answer_spans: list[tuple[int, int]] | None = None
    """``(start, end)`` character offsets in ``text`` of the text spelling each ``answer`` row."""
    block_spans: dict[str, tuple[int, int]] | None = None
    """``{"think" | "look" | "answer": (start, end)}``: character offsets in ``text`` of each block's content
    (between its tags; an unclosed block ends where the next one opens)."""
    regions: list[int | None] | None = None
    """One entry per ``answer`` row: the object's ``"region"`` (the 1-based crop its box is read off, zoom
    look), None when it has none. A ``region`` that is not a positive integer (0, -1, 2.5, ``"1"``, ``true``)
    is kept as :data:`INVALID_REGION`, which names no crop: :func:`dip_r1.zoom.resolve_regions` drops such a
    box as a format error. None when there is no answer block."""


def parse_completion(
    text: str, *, max_chars: int = MAX_CHARS, max_boxes: int = MAX_BOXES
) -> ParsedCompletion:
    """Parse ``text``; never raises.

    Boxes with non-finite values or ``x2 <= x1`` or ``y2 <= y1`` are dropped. A block that is not
    valid JSON still yields the 4-number groups found in it (so a truncated answer keeps its
    complete boxes), but the completion is then not well-formed.

    >>> p = parse_completion('<think>two people</think> <look>[[0, 0, 5, 5]]</look> '
    ...                      '<answer>[{"bbox_2d": [1, 2, 3, 4], "label": "person"}]</answer>')
    >>> p.well_formed, p.answer.tolist(), p.labels, p.answer_spans
    (True, [[1.0, 2.0, 3.0, 4.0]], ['person'], [(75, 87)])
    >>> p.text[75:87]
    '[1, 2, 3, 4]'
    >>> p.block_spans["look"], p.text[slice(*p.block_spans["look"])]
    ((32, 46), '[[0, 0, 5, 5]]')
    >>> parse_completion('<answer>[[1, 2, 3, 4], [5, 5, 5, 9]').answer.tolist()
    [[1.0, 2.0, 3.0, 4.0]]
    """
    if not isinstance(text, str):
        return ParsedCompletion(text="")
    try:
        return _parse(text, max_chars, max_boxes)
    except Exception:  # the guarantee callers rely on; every known path is handled in _parse
        return ParsedCompletion(text=text)


def _parse(text: str, max_chars: int, max_boxes: int) -> ParsedCompletion:
    s = text[:max_chars]
    # One regex pass finds every tag: blocks and layout both come from it (6 str.count calls cost 6x).
    tags = [(m.group(), m.start(), m.end()) for m in _TAG_RE.finditer(s)]
    blocks = {tag: _block(s, tag, tags) for tag in _TAGS}
    think = s[blocks["think"][0] : blocks["think"][1]].strip() if blocks["think"] else None
    look, _, _, _, look_ok = _boxes(s, blocks["look"], max_boxes)
    answer, spans, labels, regions, answer_ok = _boxes(s, blocks["answer"], max_boxes)
    well_formed = len(text) <= max_chars and look_ok and answer_ok and _layout_ok(s, tags)
    present = {tag: span for tag, span in blocks.items() if span is not None}
    return ParsedCompletion(text, think, look, answer, labels, well_formed, spans, present, regions)


def _block(s: str, tag: str, tags: list[tuple[str, int, int]]) -> tuple[int, int] | None:
    """``(start, end)`` of the content of the first ``<tag>`` block, or None."""
    opener, closer = f"<{tag}>", f"</{tag}>"
    start = next((end for name, _, end in tags if name == opener), None)
    if start is None:
        return None
    after = [(name, pos) for name, pos, _ in tags if pos >= start]
    end = next((pos for name, pos in after if name == closer), None)
    if end is None:  # unclosed (e.g. truncated): stop at the next block, not inside it
        end = next((pos for name, pos in after if name[1] != "/"), len(s))
    return start, end


_LAYOUT = [f"<{slash}{tag}>" for tag in _TAGS for slash in ("", "/")]


def _layout_ok(s: str, tags: list[tuple[str, int, int]]) -> bool:
    """Exactly one of each tag, in order, with nothing but whitespace outside the blocks."""
    if [name for name, _, _ in tags] != _LAYOUT:
        return False
    pos = [(start, end) for _, start, end in tags]
    outside = [s[: pos[0][0]], s[pos[1][1] : pos[2][0]], s[pos[3][1] : pos[4][0]], s[pos[5][1] :]]
    return not any(gap.strip() for gap in outside)


def _boxes(
    s: str, span: tuple[int, int] | None, max_boxes: int
) -> tuple[Tensor | None, list[tuple[int, int]] | None, list[str] | None, list[int | None] | None, bool]:
    """Boxes, spans, labels, regions of one block and whether it is a valid JSON box list."""
    if span is None:
        return None, None, None, None, False
    start, end = span
    content = s[start:end]
    items = _json_box_list(content)
    labels = None
    if items is not None:
        coords, labels, regions = items
        # In valid JSON the innermost brackets are the boxes, unless a string holds brackets:
        # then the counts differ and the spans cannot be aligned.
        found = islice(_BRACKETS_RE.finditer(content), len(coords) + 1)
        spans = [(start + m.start(), start + m.end()) for m in found]
        spans = spans[:max_boxes] if len(spans) == len(coords) else ([] if not coords else None)
        coords, labels = coords[:max_boxes], labels[:max_boxes] if labels is not None else None
        regions = regions[:max_boxes]
    else:
        matches = list(islice(_BOX_RE.finditer(content), max_boxes))
        spans = [(start + m.start(), start + m.end()) for m in matches]
        coords = [m.groups() for m in matches]
        regions = _fallback_regions(content, matches)
    try:
        array = np.array(coords, dtype=np.float64)
    except OverflowError:  # a JSON integer beyond float range: let float() turn it into inf
        array = np.array([[float(str(v)) for v in c] for c in coords], dtype=np.float64)
    values = torch.from_numpy(array.reshape(-1, 4)).float()
    keep = valid_boxes(values)
    if not bool(keep.all()):
        values = values[keep]
        kept = keep.tolist()
        spans = [sp for sp, k in zip(spans, kept) if k] if spans is not None else None
        labels = [lb for lb, k in zip(labels, kept) if k] if labels is not None else None
        regions = [r for r, k in zip(regions, kept) if k]
    return values, spans, labels, regions, items is not None


def _region(value: object) -> int:
    """A ``region`` value as :attr:`ParsedCompletion.regions` keeps it: itself when a positive integer (JSON
    ``true`` is not one), else :data:`INVALID_REGION`."""
    return value if type(value) is int and value >= 1 else INVALID_REGION


def _fallback_regions(content: str, matches: list[re.Match]) -> list[int | None]:
    """The ``region`` of each box found by the fallback (a block that is not valid JSON, e.g. cut short): the
    value of a ``"region"`` key in the same object (from the ``{`` before the box to the ``}`` after it)."""
    if '"region"' not in content:
        return [None] * len(matches)
    out: list[int | None] = []
    for i, m in enumerate(matches):
        opened = content.rfind("{", matches[i - 1].end() if i else 0, m.start())
        if opened < 0:  # a bare [x1, y1, x2, y2]: no object, no region
            out.append(None)
            continue
        stop = matches[i + 1].start() if i + 1 < len(matches) else len(content)
        closed = content.find("}", m.end(), stop)
        found = _REGION_RE.search(content, opened, closed if closed >= 0 else stop)
        if found is None:
            out.append(None)
            continue
        try:
            out.append(_region(json.loads(found.group(1))))
        except (ValueError, RecursionError):
            out.append(INVALID_REGION)
    return out


def _json_box_list(content: str) -> tuple[list[list], list[str] | None, list[int | None]] | None:
    """``(coords, labels, regions)`` when ``content`` is a JSON list of boxes, else None.

    An item is ``[x1, y1, x2, y2]`` or an object with such a ``"bbox_2d"`` (and an optional
    ``"label"`` and ``"region"``); numbers are JSON numbers (not strings, not booleans).
    """
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        return None
    if type(data) is not list:
        return None
    coords = [item.get("bbox_2d") if type(item) is dict else item for item in data]
    # set(map(...)) runs in C: these checks cost little next to json.loads itself.
    if coords and (set(map(type, coords)) != {list} or set(map(len, coords)) != {4}):
        return None
    if not set(map(type, chain.from_iterable(coords))) <= {int, float}:
        return None
    if not any(type(item) is dict for item in data):
        return coords, None, [None] * len(coords)
    labels = [item.get("label", "") if type(item) is dict else "" for item in data]
    if not set(map(type, labels)) <= {str}:
        labels = [str(label) for label in labels]
    if '"region"' not in content:  # the text look (the common case): no object to search
        return coords, labels, [None] * len(coords)
    regions = [_region(item["region"]) if type(item) is dict and "region" in item else None for item in data]
    return coords, labels, regions
