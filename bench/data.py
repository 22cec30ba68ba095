"""Data benchmark: annotation parsing speed of every reader (prints one JSON object).

``python bench/data.py``. Each reader parses its test fixture format scaled up (about 20 boxes a
sample, 10,000 samples; 2,000 for the one-file-per-image formats) written into a temporary folder.
Only annotation parsing is timed (best of 3 passes): readers never open images.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.io import savemat

from dip_r1.data.sources import COCO, UAVDT, CityPersons, CrowdHuman, JSONLines, WiderPedestrian, WiderPerson

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
SAMPLES = 10_000
"""Samples per reader for the one-file formats."""
FILES = 2_000
"""Samples for the one-file-per-image formats (CityPersons JSON, WiderPerson)."""
BOXES = 20
"""Boxes a sample, about CrowdHuman's average."""


def _xywh(i: int, k: int) -> list[int]:
    """A deterministic box ``k`` of sample ``i`` (all positive size)."""
    return [(i * 7 + k * 31) % 900, (i * 3 + k * 17) % 500, 10 + k % 40, 30 + (i + k) % 90]


def write_crowdhuman(root: Path) -> CrowdHuman:
    template = json.loads((FIXTURES / "crowdhuman" / "annotation.odgt").read_text().splitlines()[0])[
        "gtboxes"
    ]
    with open(root / "annotation.odgt", "w") as f:
        for i in range(SAMPLES):
            gtboxes = [template[k % len(template)] | {"fbox": _xywh(i, k)} for k in range(BOXES)]
            f.write(json.dumps({"ID": f"{i:06d}", "gtboxes": gtboxes}) + "\n")
    return CrowdHuman(root / "annotation.odgt", root / "Images")


def write_citypersons_json(root: Path) -> CityPersons:
    labels = ["pedestrian"] * 3 + ["rider", "ignore"]
    for i in range(FILES):
        folder = root / "gtBboxCityPersons" / "val" / f"city{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        objects = [
            {"instanceId": k, "label": labels[k % 5], "bbox": _xywh(i, k), "bboxVis": _xywh(i, k)}
            for k in range(BOXES)
        ]
        doc = {"imgHeight": 1024, "imgWidth": 2048, "objects": objects}
        (folder / f"city{i % 10}_{i:06d}_000019_gtBboxCityPersons.json").write_text(json.dumps(doc, indent=4))
    return CityPersons(root, "val")


def write_citypersons_mat(root: Path) -> CityPersons:
    cells = np.empty((1, SAMPLES), dtype=object)
    for i in range(SAMPLES):
        rows = [[k % 3, *_xywh(i, k), k, *_xywh(i, k)] for k in range(BOXES)]
        cells[0, i] = {
            "cityname": "city",
            "im_name": f"city_{i:06d}_000019_leftImg8bit.png",
            "bbs": np.array(rows, float),
        }
    savemat(root / "anno_val.mat", {"anno_val_aligned": cells})
    return CityPersons(root, "val")


def write_wider_pedestrian(root: Path) -> WiderPedestrian:
    with open(root / "annotations.txt", "w") as ann, open(root / "ignore.txt", "w") as ign:
        for i in range(SAMPLES):
            groups = " ".join(f"{1 + k % 2} " + " ".join(map(str, _xywh(i, k))) for k in range(BOXES))
            ann.write(f"img{i:06d}.jpg {groups}\n")
            ign.write(f"img{i:06d}.jpg " + " ".join(map(str, _xywh(i, 99) + _xywh(i, 98))) + "\n")
    return WiderPedestrian(root / "annotations.txt", root / "images", root / "ignore.txt")


def write_widerperson(root: Path) -> WiderPerson:
    (root / "Annotations").mkdir()
    names = [f"{i:06d}" for i in range(FILES)]
    (root / "train.txt").write_text("\n".join(names) + "\n")
    for i, name in enumerate(names):
        rows = [(1 + k % 5, *_xywh(i, k)) for k in range(BOXES)]
        lines = [f"{c} {x} {y} {x + w} {y + h}" for c, x, y, w, h in rows]
        (root / "Annotations" / f"{name}.jpg.txt").write_text(f"{BOXES}\n" + "\n".join(lines) + "\n")
    return WiderPerson(root, "train")


def write_uavdt(root: Path) -> UAVDT:
    (root / "GT").mkdir()
    frames = SAMPLES // 10
    for s in range(10):
        with open(root / "GT" / f"M{s:04d}_gt_whole.txt", "w") as f:
            for k in range(BOXES):  # MOT order: by target, then frame
                for frame in range(1, frames + 1):
                    f.write(",".join(map(str, [frame, k, *_xywh(frame, k), 1, 1, 1 + k % 3])) + "\n")
    return UAVDT(root)


def write_coco(root: Path) -> COCO:
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "width": 1000, "height": 600} for i in range(SAMPLES)]
    annotations = [
        {
            "id": i * BOXES + k,
            "image_id": i,
            "category_id": 1 + k % 2,
            "bbox": _xywh(i, k),
            "iscrowd": int(k == 0),
        }
        for i in range(SAMPLES)
        for k in range(BOXES)
    ]
    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]
    (root / "instances.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return COCO(root / "instances.json", root / "images")


def write_jsonlines(root: Path) -> JSONLines:
    with open(root / "data.jsonl", "w") as f:
        for i in range(SAMPLES):
            boxes = [[x, y, x + w, y + h] for x, y, w, h in (_xywh(i, k) for k in range(BOXES))]
            f.write(
                json.dumps({"image": f"{i:06d}.jpg", "boxes": boxes, "labels": ["person"] * BOXES}) + "\n"
            )
    return JSONLines(root / "data.jsonl")


WRITERS = {
    "crowdhuman": write_crowdhuman,
    "citypersons_json": write_citypersons_json,
    "citypersons_mat": write_citypersons_mat,
    "wider_pedestrian": write_wider_pedestrian,
    "widerperson": write_widerperson,
    "uavdt": write_uavdt,
    "coco": write_coco,
    "jsonlines": write_jsonlines,
}


def _timed_pass(reader) -> tuple[int, int, float]:
    """One full pass: samples, boxes (targets + ignore regions), seconds."""
    start = time.perf_counter()
    samples = boxes = 0
    for sample in reader:
        samples += 1
        boxes += len(sample.boxes) + len(sample.ignore)
    return samples, boxes, time.perf_counter() - start


def bench_readers(repeats: int = 3) -> dict[str, dict[str, float]]:
    """Time full passes of each reader over its scaled-up annotations (best of ``repeats``).

    Returns, per reader: samples, boxes (targets + ignore regions), seconds and samples/s.
    """
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in WRITERS.items():
            root = Path(tmp) / name
            root.mkdir()
            reader = write(root)
            samples, boxes, seconds = min((_timed_pass(reader) for _ in range(repeats)), key=lambda r: r[2])
            assert not reader.skipped, (name, reader.skipped)  # the bench data must be clean
            results[name] = {
                "samples": samples,
                "boxes": boxes,
                "seconds": round(seconds, 3),
                "samples_per_s": round(samples / seconds, 1),
            }
    return results


def bench_datamodule(n: int = 400, batch_size: int = 8) -> dict[str, object]:
    """Samples per second through the DataModule (tiny Qwen2-VL processor) on the synthetic set.

    One pass over ``n`` synthetic crowd images with 2 DataLoader workers, then in the main process.
    """
    from dip_r1.data import DetectionDataModule
    from dip_r1.data.synthetic import generate
    from dip_r1.models import load_processor
    from dip_r1.tiny import save_tiny

    result: dict[str, object] = {"samples": n, "batch_size": batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        odgt = generate(Path(tmp) / "synthetic", n, seed=0)
        processor = load_processor(save_tiny(Path(tmp) / "tiny", "qwen2_vl", "xs"))
        for workers in (2, 0):
            source = CrowdHuman(odgt, odgt.parent / "Images")
            dm = DetectionDataModule(
                train=[source], batch_size=batch_size, num_workers=workers, repeat_train=False
            )
            dm.connect(processor)
            start = time.perf_counter()
            seen = 0
            for batch in dm.train_dataloader():
                delivered = dm.on_before_batch_transfer(batch, 0)
                seen += len(delivered["targets"]) if delivered is not None else 0
            seconds = time.perf_counter() - start
            assert seen == n, (workers, seen)
            result[f"workers_{workers}"] = {
                "seconds": round(seconds, 3),
                "samples_per_s": round(seen / seconds, 1),
            }
    return result


def environment() -> dict[str, object]:
    """When and where the figures were taken."""
    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


if __name__ == "__main__":
    print(
        json.dumps(
            {"environment": environment(), "readers": bench_readers(), "datamodule": bench_datamodule()},
            indent=2,
        )
    )
