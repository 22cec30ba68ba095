"""CityPersons reader: the Cityscapes ``gtBboxCityPersons`` JSON files or the original ``anno_<split>.mat``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dip_r1.data.sample import DetectionSample
from dip_r1.data.sources.base import BadInput, SourceMixin, parse_box, where

JSON_LABELS = {
    "pedestrian": True,
    "ignore": False,
    "rider": False,
    "sitting person": False,
    "person (other)": False,
    "person group": False,
}
"""Cityscapes label -> is a target (every other known label is an ignore region)."""
MAT_LABELS = {1: True, 0: False, 2: False, 3: False, 4: False, 5: False}
"""``anno_*.mat`` label id (0 ignore, 1 pedestrian, 2 rider, 3 sitting, 4 other, 5 group) -> is a target."""
SETTINGS = {"reasonable": (50.0, 0.65), "all": (0.0, 0.0)}
"""Setting -> (minimum height in px, minimum visible fraction) of a target pedestrian."""


class CityPersons(SourceMixin):
    """CityPersons pedestrians; the other person labels and out-of-setting pedestrians are ignore regions.

    Reads ``<root>/gtBboxCityPersons/<split>/<city>/*_gtBboxCityPersons.json`` (``objects: [{"label",
    "bbox": [x, y, w, h], "bboxVis"}]``, with the image size) when that folder exists, else
    ``<root>/anno_<split>.mat`` or ``<root>/annotations/anno_<split>.mat`` (cells of ``cityname``,
    ``im_name``, ``bbs`` rows ``[label, x, y, w, h, id, x_vis, y_vis, w_vis, h_vis]``; no image size,
    so ``width == height == 0`` and boxes are clipped once the dataset opens the image). Images are
    ``<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png``. Targets are labelled ``"pedestrian"``.

    Args:
        root: the CityPersons / Cityscapes folder.
        split: ``"train"`` or ``"val"`` (any folder name under ``gtBboxCityPersons``).
        setting: ``"reasonable"`` turns pedestrians under 50 px tall or under 0.65 visible into ignore
            regions; ``"all"`` keeps every pedestrian a target.
        strict: raise ``ValueError`` on bad input instead of skipping, counting and warning.
        name: dataset name for per-dataset metrics (default ``"citypersons"``).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        setting: str = "reasonable",
        strict: bool = False,
        name: str | None = None,
    ) -> None:
        if setting not in SETTINGS:
            raise ValueError(f"setting must be one of {sorted(SETTINGS)}, got {setting!r}")
        self.root = Path(root)
        self.split = split
        self.setting = setting
        self._init_source(name, strict)

    def annotation_path(self) -> Path:
        """The JSON folder or the ``.mat`` file this reader reads."""
        json_dir = self.root / "gtBboxCityPersons" / self.split
        if json_dir.is_dir():
            return json_dir
        for candidate in (
            self.root / f"anno_{self.split}.mat",
            self.root / "annotations" / f"anno_{self.split}.mat",
        ):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"no {json_dir} folder nor anno_{self.split}.mat under {self.root}")

    def __iter__(self) -> Iterator[DetectionSample]:
        path = self.annotation_path()
        yield from (self._iter_mat(path) if path.suffix == ".mat" else self._iter_json(path))

    def _image(self, city: str, image_name: str) -> Path:
        return self.root / "leftImg8bit" / self.split / city / image_name

    def _iter_json(self, folder: Path) -> Iterator[DetectionSample]:
        for path in sorted(folder.glob("*/*_gtBboxCityPersons.json")):
            try:
                with open(path, encoding="utf-8-sig") as handle:  # a byte order mark is no part of the data
                    record = json.load(handle)
            except json.JSONDecodeError as error:
                self._skip("malformed_record", where(path, error.lineno), f"not valid JSON ({error.msg})")
                continue
            stem = path.name[: -len("_gtBboxCityPersons.json")]
            try:
                width, height = int(record["imgWidth"]), int(record["imgHeight"])
                objects = record["objects"]
                if not isinstance(objects, list):
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                self._skip("malformed_record", str(path), "needs imgWidth, imgHeight and an objects list")
                continue
            entries = []
            for index, obj in enumerate(objects):
                location = where(path, f"objects[{index}]")
                try:
                    if not isinstance(obj, dict):
                        raise BadInput("malformed_box", f"expected an object, got {obj!r}")
                    if obj.get("label") not in JSON_LABELS:
                        raise BadInput("unknown_label", f"unknown label {obj.get('label')!r}")
                    full = parse_box(obj.get("bbox"))
                    visible = parse_box(obj["bboxVis"]) if "bboxVis" in obj else None
                except BadInput as error:
                    self._skip_bad(error, location)
                    continue
                entries.append((JSON_LABELS[obj["label"]], full, visible, location))
            yield self._sample(stem, path.parent.name, f"{stem}_leftImg8bit.png", entries, width, height)

    def _iter_mat(self, path: Path) -> Iterator[DetectionSample]:
        from scipy.io import loadmat  # imported here: only the .mat flavour needs it

        data = loadmat(path, simplify_cells=True)
        key = f"anno_{self.split}_aligned"
        if key not in data:  # other releases name the variable differently: take the only one
            key = next(k for k in data if not k.startswith("__"))
        cells = data[key]
        cells = [cells] if isinstance(cells, dict) else list(np.ravel(cells))
        for cell_index, cell in enumerate(cells):
            location = where(path, f"cell {cell_index}")
            try:
                city = str(cell.get("cityname", cell.get("city_name")))
                image_name = str(cell["im_name"])
                rows = np.asarray(cell["bbs"], dtype=np.float64).reshape(-1, 10)
            except (AttributeError, KeyError, TypeError, ValueError):
                self._skip("malformed_record", location, "needs cityname, im_name and 10-column bbs")
                continue
            entries = []
            for row_index, row in enumerate(rows.tolist()):
                row_location = where(path, f"cell {cell_index}, bbs row {row_index}")
                try:
                    if int(row[0]) not in MAT_LABELS:
                        raise BadInput("unknown_label", f"unknown label id {row[0]:g}")
                    full = parse_box(row[1:5])
                    visible = parse_box(row[6:10])
                except BadInput as error:
                    self._skip_bad(error, row_location)
                    continue
                entries.append((MAT_LABELS[int(row[0])], full, visible, row_location))
            stem = image_name.removesuffix(".png").removesuffix("_leftImg8bit")
            yield self._sample(stem, city, image_name, entries, 0, 0)

    def _sample(
        self, stem: str, city: str, image_name: str, entries: list, width: int, height: int
    ) -> DetectionSample:
        """Split (is_pedestrian, full xywh, visible xywh, location) entries into targets and ignore regions."""
        min_height, min_visible = SETTINGS[self.setting]
        boxes, ignore = [], []
        for is_pedestrian, full, visible, location in entries:
            # Boxes are [x, y, w, h]. Fraction of the full box that is visible; unknown (no bboxVis)
            # counts as fully visible.
            box_h, area = full[3], full[2] * full[3]
            fraction = 1.0 if visible is None or area <= 0 else visible[2] * visible[3] / area
            target = is_pedestrian and box_h >= min_height and fraction >= min_visible
            (boxes if target else ignore).append((full, location))
        boxes_t, labels = self._targets(
            [b for b, _ in boxes],
            ["pedestrian"] * len(boxes),
            [at for _, at in boxes],
            width,
            height,
            xywh=True,
        )
        regions = self._regions([b for b, _ in ignore], [at for _, at in ignore], width, height, xywh=True)
        return DetectionSample(
            image_id=stem,
            image_path=self._image(city, image_name),
            width=width,
            height=height,
            boxes=boxes_t,
            labels=labels,
            ignore=regions,
        )
