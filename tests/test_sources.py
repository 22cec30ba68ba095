"""Dataset readers on small hand-written files in each format (tests/fixtures/<dataset>/)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest

from dip_r1.data.sample import DetectionSample
from dip_r1.data.sources import COCO, UAVDT, CityPersons, CrowdHuman, JSONLines, WiderPedestrian, WiderPerson

FIXTURES = Path(__file__).parent / "fixtures"
CH = FIXTURES / "crowdhuman"
CP = FIXTURES / "citypersons"
WP = FIXTURES / "wider_pedestrian"
WPER = FIXTURES / "widerperson"
UAV = FIXTURES / "uavdt"


def read(reader) -> list[DetectionSample]:
    """All samples, failing on any warning (good fixtures must read cleanly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples = list(reader)
    assert all(isinstance(s, DetectionSample) for s in samples)
    assert reader.skipped == {}
    return samples


def read_bad(reader) -> tuple[list[DetectionSample], list[str]]:
    """All samples and the warning messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(reader)
    return samples, [str(w.message) for w in caught]


def by_id(samples: list[DetectionSample]) -> dict[str, DetectionSample]:
    return {s.image_id: s for s in samples}


# --- CrowdHuman ---------------------------------------------------------------------------------


def test_crowdhuman_full_boxes_masks_and_ignored_persons():
    samples = read(CrowdHuman(CH / "annotation.odgt", CH / "Images"))
    assert [s.image_id for s in samples] == ["273271,c9db000d5146c15", "284193,faa9000f2678b5e", "empty,0"]
    first = samples[0]
    assert first.image_path == CH / "Images" / "273271,c9db000d5146c15.jpg"
    assert (first.width, first.height) == (0, 0)
    # fbox [10, 20, 30, 60] -> [10, 20, 40, 80]; [50, 10, 40, 80] -> [50, 10, 90, 90]
    assert first.boxes.tolist() == [[10, 20, 40, 80], [50, 10, 90, 90]]
    assert first.labels == ["person", "person"]
    # the mask and the person with extra.ignore == 1
    assert first.ignore.tolist() == [[100, 0, 150, 30], [0, 0, 5, 8]]
    # no image size in the format: a box past the left edge is kept as is (clipped later)
    assert samples[1].boxes.tolist() == [[-5, 3, 20, 53]]
    assert samples[2].boxes.shape == (0, 4) and samples[2].labels == []


def test_crowdhuman_visible_and_head_boxes():
    visible = read(CrowdHuman(CH / "annotation.odgt", CH / "Images", box="visible"))[0]
    assert visible.boxes.tolist() == [[12, 22, 32, 62], [50, 10, 90, 60]]
    assert visible.ignore.tolist() == [[100, 0, 150, 30], [0, 0, 4, 6]]
    head = read(CrowdHuman(CH / "annotation.odgt", CH / "Images", box="head"))[0]
    # the second person's head has head_attr.ignore == 1: an ignore region, not a target
    assert head.boxes.tolist() == [[18, 22, 28, 32]]
    assert head.ignore.tolist() == [[60, 12, 72, 26], [100, 0, 150, 30], [1, 0, 4, 3]]
    with pytest.raises(ValueError, match="box must be one of"):
        CrowdHuman(CH / "annotation.odgt", CH / "Images", box="torso")


def test_crowdhuman_bad_input_is_skipped_counted_and_warned():
    reader = CrowdHuman(CH / "bad.odgt", CH / "Images")
    samples, messages = read_bad(reader)
    assert [s.image_id for s in samples] == ["a", "c", "d"]
    assert by_id(samples)["c"].boxes.tolist() == [[1, 2, 4, 6]]
    assert reader.skipped == {"malformed_line": 2, "empty_box": 1, "unknown_label": 1, "malformed_box": 1}
    assert any("bad.odgt:2" in m and "not valid JSON" in m for m in messages)
    assert any("bad.odgt:3" in m and "'dog'" in m for m in messages)
    assert any("bad.odgt:3" in m and "no area" in m for m in messages)
    assert len(messages) == 5


def test_crowdhuman_strict_raises_naming_file_and_line():
    with pytest.raises(ValueError, match=r"bad\.odgt:2: not valid JSON"):
        list(CrowdHuman(CH / "bad.odgt", CH / "Images", strict=True))


# --- CityPersons --------------------------------------------------------------------------------


def test_citypersons_json_reasonable():
    samples = read(CityPersons(CP, "val"))
    assert [s.image_id for s in samples] == ["frankfurt_000000_000294", "lindau_000001_000019"]
    s = samples[0]
    assert (
        s.image_path == CP / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png"
    )
    assert (s.width, s.height) == (2048, 1024)
    # 60x150 fully visible; 80x200 with 58x200 visible (0.725 >= 0.65), clipped at x = 2048
    assert s.boxes.tolist() == [[1500, 300, 1560, 450], [1990, 500, 2048, 700]]
    assert s.labels == ["pedestrian", "pedestrian"]
    # 40 px tall (< 50), half visible (0.5 < 0.65), a rider, an ignore label clipped at x = 2048
    assert s.ignore.tolist() == [
        [947, 406, 964, 446],
        [100, 200, 140, 300],
        [600, 350, 650, 470],
        [2000, 400, 2048, 460],
    ]
    assert samples[1].boxes.shape == (0, 4) and samples[1].ignore.shape == (0, 4)


def test_citypersons_json_all_keeps_small_and_occluded_pedestrians():
    s = read(CityPersons(CP, "val", setting="all"))[0]
    assert s.boxes.tolist() == [
        [947, 406, 964, 446],
        [1500, 300, 1560, 450],
        [100, 200, 140, 300],
        [1990, 500, 2048, 700],
    ]
    assert s.ignore.tolist() == [[600, 350, 650, 470], [2000, 400, 2048, 460]]
    with pytest.raises(ValueError, match="setting"):
        CityPersons(CP, "val", setting="hard")


def test_citypersons_mat():
    samples = read(CityPersons(CP / "mat", "val"))
    assert [s.image_id for s in samples] == [
        "frankfurt_000000_000294",
        "lindau_000001_000019",
        "munster_000002_000019",
    ]
    s = samples[0]
    assert (
        s.image_path
        == CP / "mat" / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png"
    )
    assert (s.width, s.height) == (0, 0)
    assert s.boxes.tolist() == [[1500, 300, 1560, 450]]
    # no image size in the .mat: the ignore region [2000, 400, 100, 60] is not clipped here
    assert s.ignore.tolist() == [[947, 406, 964, 446], [600, 350, 650, 470], [2000, 400, 2100, 460]]
    assert samples[1].boxes.shape == (0, 4)
    # a single-row bbs (30x80, 30x60 visible = 0.75)
    assert samples[2].boxes.tolist() == [[10, 20, 40, 100]]


def test_citypersons_json_bad_input():
    reader = CityPersons(CP, "bad")
    samples, messages = read_bad(reader)
    assert [s.image_id for s in samples] == ["frankfurt_000000_000001"]
    assert samples[0].boxes.tolist() == [[300, 100, 340, 200]]
    assert reader.skipped == {"unknown_label": 1, "empty_box": 1, "malformed_box": 1, "malformed_record": 1}
    assert any("000001_gtBboxCityPersons.json (objects[0]): unknown label 'dog'" in m for m in messages)
    assert any("000002_gtBboxCityPersons.json:6: not valid JSON" in m for m in messages)
    with pytest.raises(ValueError, match=r"000001_gtBboxCityPersons\.json \(objects\[0\]\)"):
        list(CityPersons(CP, "bad", strict=True))


def test_citypersons_mat_bad_input():
    reader = CityPersons(CP / "mat", "bad")
    samples, messages = read_bad(reader)
    assert [s.image_id for s in samples] == ["frankfurt_000000_000001"]
    assert samples[0].boxes.tolist() == [[100, 100, 140, 200]]
    assert reader.skipped == {"unknown_label": 1, "empty_box": 1, "malformed_record": 1}
    assert any("anno_bad.mat (cell 0, bbs row 0): unknown label id 7" in m for m in messages)
    assert any("anno_bad.mat (cell 1)" in m for m in messages)
    with pytest.raises(ValueError, match=r"anno_bad\.mat \(cell 0, bbs row 0\)"):
        list(CityPersons(CP / "mat", "bad", strict=True))


def test_citypersons_missing_annotations():
    with pytest.raises(FileNotFoundError):
        list(CityPersons(CP, "test"))


# --- WIDER Pedestrian ---------------------------------------------------------------------------


def test_wider_pedestrian():
    reader = WiderPedestrian(WP / "train_annotations.txt", WP / "images", WP / "train_ignore.txt")
    samples = read(reader)
    assert [s.image_id for s in samples] == ["img00001", "img00002", "img00003"]
    s = samples[0]
    assert s.image_path == WP / "images" / "img00001.jpg"
    assert s.boxes.tolist() == [[100, 200, 130, 280], [300, 210, 340, 300], [10, 20, 15, 32]]
    assert s.labels == ["pedestrian", "cyclist", "pedestrian"]
    assert s.ignore.tolist() == [[500, 100, 560, 140], [700, 120, 720, 140]]
    assert samples[1].boxes.shape == (0, 4) and samples[1].ignore.shape == (0, 4)
    assert samples[2].ignore.tolist() == [[5, 5, 15, 15]]
    # without an ignore file, no regions
    assert read(WiderPedestrian(WP / "train_annotations.txt", WP / "images"))[0].ignore.shape == (0, 4)


def test_wider_pedestrian_bad_input():
    reader = WiderPedestrian(WP / "bad_annotations.txt", WP / "images", WP / "bad_ignore.txt")
    samples, messages = read_bad(reader)
    assert [s.image_id for s in samples] == ["img00010", "img00013"]
    assert samples[0].boxes.tolist() == [[10, 10, 30, 30]]
    assert samples[1].labels == ["cyclist"] and samples[1].ignore.tolist() == [[0, 0, 5, 5]]
    assert reader.skipped == {"malformed_line": 3, "unknown_label": 1, "empty_box": 1}
    assert any("bad_ignore.txt:1" in m for m in messages)
    assert any("bad_annotations.txt:1: unknown label id 3" in m for m in messages)
    assert any("bad_annotations.txt:3: expected numbers" in m for m in messages)
    with pytest.raises(ValueError, match=r"bad_ignore\.txt:1"):
        list(WiderPedestrian(WP / "bad_annotations.txt", WP / "images", WP / "bad_ignore.txt", strict=True))
    with pytest.raises(ValueError, match=r"bad_annotations\.txt:1: unknown label id 3"):
        list(WiderPedestrian(WP / "bad_annotations.txt", WP / "images", strict=True))


# --- WiderPerson --------------------------------------------------------------------------------


def test_widerperson():
    reader = WiderPerson(WPER, "train")
    assert len(reader) == 2
    samples = read(reader)
    assert [s.image_id for s in samples] == ["000040", "000041"]
    s = samples[0]
    assert s.image_path == WPER / "Images" / "000040.jpg"
    assert s.boxes.tolist() == [[10, 20, 50, 120], [60, 30, 90, 110], [100, 40, 130, 100]]
    assert s.labels == ["pedestrian", "rider", "partially-visible person"]
    # classes 4 (ignore) and 5 (crowd)
    assert s.ignore.tolist() == [[200, 10, 260, 50], [300, 0, 400, 80]]
    assert samples[1].boxes.shape == (0, 4)
    assert read(WiderPerson(WPER, "val"))[0].boxes.tolist() == [[1, 2, 3, 4]]


def test_widerperson_bad_input():
    reader = WiderPerson(WPER, "bad")
    samples, messages = read_bad(reader)
    assert [s.image_id for s in samples] == ["000060", "000062"]
    assert samples[0].boxes.tolist() == [[5, 5, 25, 45]]
    assert samples[1].boxes.tolist() == [[0, 0, 4, 4]] and samples[1].labels == ["rider"]
    assert reader.skipped == {
        "empty_box": 1,
        "unknown_label": 1,
        "malformed_record": 1,
        "malformed_line": 1,
        "missing_annotation": 1,
    }
    assert any("000060.jpg.txt:2: box [10.0, 10.0, 10.0, 50.0] has no area" in m for m in messages)
    assert any("000061.jpg.txt:1: count says 3 boxes but 1 lines follow" in m for m in messages)
    assert any("bad.txt:4: no annotation file" in m for m in messages)
    with pytest.raises(ValueError, match=r"000060\.jpg\.txt:3: unknown class 6"):
        list(WiderPerson(WPER, "bad", strict=True))


# --- UAVDT --------------------------------------------------------------------------------------


def test_uavdt_groups_rows_by_frame():
    samples = read(UAVDT(UAV))
    assert [s.image_id for s in samples] == ["M0101_000001", "M0101_000002", "M0101_000003", "M0202_000005"]
    f1, f2, f3, other = samples
    assert f1.image_path == UAV / "M0101" / "img000001.jpg"
    assert f1.boxes.tolist() == [[100, 200, 140, 230], [300, 50, 380, 90], [500, 300, 620, 360]]
    assert f1.labels == ["car", "truck", "bus"]
    assert f1.ignore.tolist() == [[0, 0, 200, 100]]
    assert f2.boxes.tolist() == [[102, 201, 142, 231], [305, 52, 385, 92]] and f2.ignore.shape == (0, 4)
    # a frame with ignore regions only
    assert f3.boxes.shape == (0, 4) and f3.ignore.tolist() == [[10, 10, 30, 30]]
    assert other.boxes.tolist() == [[1, 2, 4, 6]]
    assert [s.image_id for s in read(UAVDT(UAV, sequences=["M0202"]))] == ["M0202_000005"]


def test_uavdt_bad_input():
    reader = UAVDT(UAV / "bad")
    samples, messages = read_bad(reader)
    assert len(samples) == 1 and samples[0].boxes.tolist() == [[10, 10, 30, 30]]
    assert reader.skipped == {"empty_box": 1, "unknown_label": 1, "malformed_line": 2}
    assert any("X0001_gt_whole.txt:2: box" in m for m in messages)
    assert any("X0001_gt_whole.txt:5: expected 9" in m for m in messages)
    with pytest.raises(ValueError, match=r"X0001_gt_whole\.txt:3: unknown category 7"):
        list(UAVDT(UAV / "bad", strict=True))


# --- COCO ---------------------------------------------------------------------------------------


def test_coco():
    samples = read(COCO(FIXTURES / "coco" / "instances.json", FIXTURES / "coco" / "images"))
    assert [s.image_id for s in samples] == ["1", "2", "3"]
    s1, s2, s3 = samples
    assert (s1.width, s1.height) == (640, 480)
    # the car [600, 400, 100, 100] is clipped to the 640x480 image
    assert s1.boxes.tolist() == [[10, 20, 40, 60], [600, 400, 640, 480]]
    assert s1.labels == ["person", "car"]
    assert s1.ignore.tolist() == [[200, 100, 350, 300]]
    assert s2.boxes.tolist() == [[5.5, 6.5, 15.5, 26.5]] and s2.ignore.tolist() == [[0, 0, 10, 10]]
    assert s3.image_path == FIXTURES / "coco" / "images" / "sub" / "000003.jpg" and s3.boxes.shape == (0, 4)


def test_coco_category_filter():
    coco = FIXTURES / "coco" / "instances.json"
    s1, s2, _ = read(COCO(coco, "images", categories=["person"]))
    assert s1.labels == ["person"] and s1.ignore.tolist() == [[200, 100, 350, 300]]
    # the crowd of cars is not an ignore region when cars are not wanted
    assert s2.ignore.shape == (0, 4)
    with pytest.raises(ValueError, match="no categories named"):
        list(COCO(coco, "images", categories=["unicorn"]))


def test_coco_bad_input():
    reader = COCO(FIXTURES / "coco" / "bad_instances.json", "images")
    samples, messages = read_bad(reader)
    assert [s.image_id for s in samples] == ["1"]
    # [150, 10, 20, 20] lies right of the 100x50 image; [90, 40, 20, 20] is clipped to it
    assert samples[0].boxes.tolist() == [[90, 40, 100, 50]]
    assert reader.skipped == {"empty_box": 1, "unknown_label": 1, "malformed_box": 1, "malformed_record": 2}
    assert any(
        "(annotations[0]): box [150.0, 10.0, 170.0, 30.0] has no area inside the 100x50 image" in m
        for m in messages
    )
    assert any("(annotations[3]): image_id 7 is not in images" in m for m in messages)
    with pytest.raises(ValueError, match=r"bad_instances\.json \(annotations\[1\]\): unknown category_id 9"):
        list(COCO(FIXTURES / "coco" / "bad_instances.json", "images", strict=True))


# --- JSON Lines ---------------------------------------------------------------------------------


def test_jsonlines():
    path = FIXTURES / "jsonlines" / "data.jsonl"
    a, b, c = read(JSONLines(path))
    assert a.image_id == "images/a.jpg" and a.image_path == path.parent / "images" / "a.jpg"
    assert a.boxes.tolist() == [[10, 20, 30, 60], [5, 5, 15, 25]] and a.labels == ["person", "bicycle"]
    assert a.ignore.tolist() == [[100, 100, 150, 150]]
    assert (b.image_id, b.labels, b.width, b.height) == ("b", ["object"], 50, 40)
    # clipped to the 50x40 image given on the line; an absolute path stays absolute
    assert c.boxes.tolist() == [[45, 30, 50, 40]] and c.image_path == Path("/abs/c.jpg")
    assert read(JSONLines(path, image_root="/data"))[0].image_path == Path("/data/images/a.jpg")


def test_jsonlines_bad_input():
    reader = JSONLines(FIXTURES / "jsonlines" / "bad.jsonl")
    samples, messages = read_bad(reader)
    assert [s.image_id for s in samples] == ["a.jpg", "c.jpg", "d.jpg"]
    assert samples[1].boxes.tolist() == [[0, 0, 10, 10]] and samples[1].labels == ["x"]
    assert samples[2].boxes.shape == (0, 4)
    assert reader.skipped == {"empty_box": 2, "malformed_line": 3, "malformed_box": 1, "unknown_label": 1}
    assert any("bad.jsonl:2: 1 boxes but 2 labels" in m for m in messages)
    assert any(
        "bad.jsonl:6: box [60.0, 0.0, 70.0, 10.0] has no area inside the 50x40 image" in m for m in messages
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: box \[5\.0, 5\.0, 5\.0, 9\.0\] has no area"):
        list(JSONLines(FIXTURES / "jsonlines" / "bad.jsonl", strict=True))


def test_warnings_are_capped_but_every_skip_is_counted():
    reader = JSONLines(FIXTURES / "jsonlines" / "bad.jsonl")
    reader.max_warnings = 2
    _, messages = read_bad(reader)
    # malformed lines 2, 3 and 4: the second warning says so, the third is only counted
    assert any(
        "bad.jsonl:3" in m and "further 'malformed_line' skips are only counted" in m for m in messages
    )
    assert not any("bad.jsonl:4" in m for m in messages)
    assert reader.skipped["malformed_line"] == 3


# --- all readers --------------------------------------------------------------------------------


def all_readers(strict: bool = False) -> list:
    return [
        CrowdHuman(CH / "annotation.odgt", CH / "Images"),
        CrowdHuman(CH / "bad.odgt", CH / "Images"),
        CityPersons(CP, "val"),
        CityPersons(CP, "bad"),
        CityPersons(CP / "mat", "val"),
        CityPersons(CP / "mat", "bad"),
        WiderPedestrian(WP / "bad_annotations.txt", WP / "images", WP / "bad_ignore.txt"),
        WiderPerson(WPER, "bad"),
        UAVDT(UAV),
        UAVDT(UAV / "bad"),
        COCO(FIXTURES / "coco" / "bad_instances.json", "images"),
        JSONLines(FIXTURES / "jsonlines" / "bad.jsonl"),
    ]


def test_names_default_to_the_class_and_can_be_overridden():
    names = [r.name for r in all_readers()]
    assert names[:3] == ["crowdhuman", "crowdhuman", "citypersons"]
    assert set(names) == {
        "crowdhuman",
        "citypersons",
        "widerpedestrian",
        "widerperson",
        "uavdt",
        "coco",
        "jsonlines",
    }
    assert CrowdHuman(CH / "annotation.odgt", CH, name="ch-val").name == "ch-val"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    # pytest's own bytecode cache (it imports make_mat.py for doctests) is not the readers' doing
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in root.rglob("*")
        if "__pycache__" not in p.parts
    }


def test_nothing_is_written_to_the_dataset_folders():
    before = snapshot(FIXTURES)
    for reader in all_readers():
        read_bad(reader)
    assert snapshot(FIXTURES) == before


# --- configuration and new datasets -------------------------------------------------------------


def test_readers_are_built_from_yaml_class_path():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--train", type=list[CrowdHuman | UAVDT])
    config = parser.parse_string(
        f"""
        train:
          - class_path: dip_r1.data.sources.CrowdHuman
            init_args: {{annotation_file: {CH / "annotation.odgt"}, image_dir: {CH / "Images"}, box: visible}}
          - class_path: dip_r1.data.sources.UAVDT
            init_args: {{root: {UAV}, sequences: [M0202], name: drone}}
        """
    )
    crowd, drone = parser.instantiate_classes(config).train
    assert crowd.box == "visible" and drone.name == "drone"
    assert read(drone)[0].boxes.tolist() == [[1, 2, 4, 6]]


class CSVBoxes:
    """The CONTRIBUTING.md example, verbatim: one row a box, ``image,x1,y1,x2,y2,label``.

    Args:
        path: the CSV file.
        image_dir: folder the image names are relative to.
        name: dataset name for per-dataset metrics.
    """

    def __init__(self, path: str, image_dir: str, name: str = "csvboxes") -> None:
        self.path, self.image_dir, self.name = Path(path), Path(image_dir), name

    def __iter__(self):
        rows: dict[str, list[list[str]]] = {}
        with open(self.path, newline="") as f:
            for image, *box, label in csv.reader(f):
                rows.setdefault(image, []).append([*box, label])
        for image, boxes in rows.items():
            yield DetectionSample(
                image_id=image,
                image_path=self.image_dir / image,
                width=0,  # unknown: the image is opened (and boxes clipped) in the DataLoader workers
                height=0,
                boxes=[[float(v) for v in b[:4]] for b in boxes],
                labels=[b[4] for b in boxes],
            )


def test_the_contributing_example_reader(tmp_path):
    (tmp_path / "boxes.csv").write_text("a.jpg,1,2,3,4,person\nb.jpg,0,0,5,5,dog\na.jpg,5,6,7,8,person\n")
    a, b = CSVBoxes(str(tmp_path / "boxes.csv"), str(tmp_path))
    assert a.image_path == tmp_path / "a.jpg" and a.boxes.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert b.labels == ["dog"]


def test_image_folder_that_matches_nothing_says_so(tmp_path):
    import pytest

    from dip_r1.data import ImageFolder

    for pattern in (tmp_path, tmp_path / "missing" / "*.jpg"):
        with pytest.raises(FileNotFoundError, match="no images there"):
            list(ImageFolder(pattern))


# --- HoldOut ------------------------------------------------------------------------------------
def test_hold_out_splits_by_image_id_whatever_the_order():
    from dip_r1.data.sources import HoldOut

    samples = [DetectionSample(str(i), Path(f"{i}.jpg"), 0, 0) for i in range(200)]
    held = [s.image_id for s in HoldOut(samples, "held_out", fraction=0.25, name="validation")]
    rest = [s.image_id for s in HoldOut(samples, "rest", fraction=0.25)]
    assert sorted(held + rest, key=int) == [str(i) for i in range(200)] and not set(held) & set(rest)
    assert 30 <= len(held) <= 70  # about a quarter
    assert [s.image_id for s in HoldOut(samples[::-1], "held_out", fraction=0.25)] == held[::-1]
    assert [s.image_id for s in HoldOut(samples, "held_out", fraction=0.25, seed=1)] != held
    assert HoldOut(samples, "held_out", name="validation").name == "validation"
    reader = CrowdHuman(CH / "annotation.odgt", CH / "Images")
    assert HoldOut(reader).name == "crowdhuman" and HoldOut(reader).skipped is reader.skipped
    for bad in ({"part": "test"}, {"fraction": 1.0}, {"fraction": 0.0}):
        with pytest.raises(ValueError):
            HoldOut(samples, **bad)
