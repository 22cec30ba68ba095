"""COCO-format detection reader (``instances_*.json``)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from dip_r1.data.sample import DetectionSample
from dip_r1.data.sources.base import BadInput, SourceMixin, parse_box, where


class COCO(SourceMixin):
    """A COCO-format annotation file: ``images``, ``annotations`` (``bbox`` ``[x, y, w, h]``) and ``categories``.

    Labels are the category names; ``iscrowd`` annotations are ignore regions. Width and height come
    from the ``images`` entries, so boxes are clipped here. A JSON document cannot be streamed line
    by line: the file is loaded when iteration starts (not in ``__init__``, so the reader stays light
    to copy into DataLoader workers). Images without annotations are yielded with no boxes.

    Args:
        annotation_file: the COCO ``.json`` file.
        image_dir: the folder the images' ``file_name`` entries are relative to.
        categories: category names to keep (others are dropped, crowds included); ``None`` keeps all.
        strict: raise ``ValueError`` on bad input instead of skipping, counting and warning.
        name: dataset name for per-dataset metrics (default ``"coco"``).
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        categories: Sequence[str] | None = None,
        strict: bool = False,
        name: str | None = None,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.categories = list(categories) if categories is not None else None
        self._init_source(name, strict)

    def _load(self) -> tuple[list, list, dict[int, str]]:
        path = self.annotation_file
        try:
            with open(path, encoding="utf-8-sig") as handle:  # a byte order mark is no part of the data
                data = json.load(handle)
            images, annotations = data["images"], data.get("annotations", [])
            names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        except json.JSONDecodeError as error:
            # Nothing can be read from a broken document: always an error, never an empty dataset.
            raise ValueError(
                f"{self.name}: {where(path, error.lineno)}: not valid JSON ({error.msg})"
            ) from None
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{self.name}: {path}: not a COCO document ({error!r})") from None
        if self.categories is not None:
            missing = set(self.categories) - set(names.values())
            if missing:
                raise ValueError(f"{self.name}: {path}: no categories named {sorted(missing)}")
        return images, annotations, names

    def __iter__(self) -> Iterator[DetectionSample]:
        images, annotations, names = self._load()
        wanted = set(self.categories) if self.categories is not None else set(names.values())
        path = self.annotation_file
        per_image: dict[object, list[tuple[list[float], str, bool, str]]] = {}
        for index, ann in enumerate(annotations):
            location = where(path, f"annotations[{index}]")
            try:
                if not isinstance(ann, dict) or "image_id" not in ann:
                    raise BadInput("malformed_record", "an annotation needs image_id, category_id and bbox")
                category = ann.get("category_id")
                if not isinstance(category, int) or category not in names:
                    raise BadInput("unknown_label", f"unknown category_id {category!r}")
                box = parse_box(ann.get("bbox"))
            except BadInput as error:
                self._skip_bad(error, location)
                continue
            label = names[ann["category_id"]]
            if label in wanted:
                per_image.setdefault(ann["image_id"], []).append(
                    (box, label, bool(ann.get("iscrowd", 0)), location)
                )
        for index, image in enumerate(images):
            try:
                image_id, file_name = image["id"], str(image["file_name"])
                width, height = int(image.get("width", 0)), int(image.get("height", 0))
            except (KeyError, TypeError, ValueError):
                self._skip(
                    "malformed_record", where(path, f"images[{index}]"), "an image needs id and file_name"
                )
                continue
            entries = per_image.pop(image_id, [])
            targets = [e for e in entries if not e[2]]
            crowds = [e for e in entries if e[2]]
            boxes, labels = self._targets(
                [e[0] for e in targets],
                [e[1] for e in targets],
                [e[3] for e in targets],
                width,
                height,
                xywh=True,
            )
            yield DetectionSample(
                image_id=str(image_id),
                image_path=self.image_dir / file_name,
                width=width,
                height=height,
                boxes=boxes,
                labels=labels,
                ignore=self._regions(
                    [e[0] for e in crowds], [e[3] for e in crowds], width, height, xywh=True
                ),
            )
        for image_id, entries in per_image.items():
            for entry in entries:
                self._skip("malformed_record", entry[3], f"image_id {image_id!r} is not in images")
