"""The synthetic crowd generator: deterministic, CrowdHuman-readable, boxes inside the image."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dip_r1.data.sources import CrowdHuman
from dip_r1.data.synthetic import generate, main


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = generate(tmp_path / "a", n=4, seed=3)
    b = generate(tmp_path / "b", n=4, seed=3)
    c = generate(tmp_path / "c", n=4, seed=4)
    assert a == tmp_path / "a" / "annotation.odgt"
    assert a.read_bytes() == b.read_bytes()
    image = "Images/synthetic_3_000002.jpg"
    assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_readable_by_crowdhuman_with_boxes_inside_the_image(tmp_path):
    odgt = generate(tmp_path, n=8, seed=0, width=200, height=150, min_people=8, max_people=12)
    records = [json.loads(line) for line in odgt.read_text().splitlines()]
    assert len(records) == 8
    for box in ("full", "visible", "head"):
        reader = CrowdHuman(odgt, tmp_path / "Images", box=box)
        samples = list(reader)
        assert reader.skipped == {}
        assert len(samples) == 8
        for sample in samples:
            assert sample.image_path.is_file()
            with Image.open(sample.image_path) as im:
                assert im.size == (200, 150)
            both = torch.cat([sample.boxes, sample.ignore])
            assert (both[:, :2] >= 0).all() and (both[:, 2] <= 200).all() and (both[:, 3] <= 150).all()
            assert (both[:, 2:] > both[:, :2]).all()
    persons = [g for r in records for g in r["gtboxes"] if g["tag"] == "person"]
    masks = [g for r in records for g in r["gtboxes"] if g["tag"] == "mask"]
    assert masks, "some images hold a crowd region tagged mask"
    assert all(len(r["gtboxes"]) - (r["gtboxes"][0]["tag"] == "mask") <= 12 for r in records)
    for g in persons:
        fx, fy, fw, fh = g["fbox"]
        vx, vy, vw, vh = g["vbox"]
        # the visible part lies within the full figure
        assert fx <= vx and fy <= vy and vx + vw <= fx + fw and vy + vh <= fy + fh
    # heavy occlusion: many figures are partly hidden, some so much they are ignored
    assert sum(g["extra"]["occ"] for g in persons) > len(persons) / 3
    assert any(g["extra"]["ignore"] for g in persons)


def test_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path), "--n", "2", "--seed", "0", "--width", "64", "--height", "48"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "annotation.odgt")
    assert sorted(p.name for p in (tmp_path / "Images").iterdir()) == [
        "synthetic_0_000000.jpg",
        "synthetic_0_000001.jpg",
    ]


def test_clutter_background_adds_distractors_not_annotations(tmp_path):
    plain = generate(tmp_path / "plain", n=4, seed=5, min_people=2, max_people=4)
    clutter = generate(tmp_path / "clutter", n=4, seed=5, min_people=2, max_people=4, background="clutter")
    image = "Images/synthetic_5_000000.jpg"
    assert (tmp_path / "plain" / image).read_bytes() != (tmp_path / "clutter" / image).read_bytes()
    assert (
        plain.read_bytes()
        == generate(tmp_path / "again", n=4, seed=5, min_people=2, max_people=4).read_bytes()
    )
    for record in map(json.loads, clutter.read_text().splitlines()):
        assert sum(g["tag"] == "person" for g in record["gtboxes"]) <= 4  # distractors are never annotated
    with pytest.raises(ValueError, match="background"):
        generate(tmp_path / "bad", n=1, seed=0, background="stripes")


def _persons(odgt) -> list[dict]:
    return [
        g
        for r in map(json.loads, odgt.read_text().splitlines())
        for g in r["gtboxes"]
        if g["tag"] == "person"
    ]


def test_scene_style_changes_what_is_in_the_scene_not_the_annotation_rules(tmp_path):
    from dip_r1.data.synthetic import SceneStyle

    kw = dict(n=6, seed=7, width=160, height=120, min_people=10, max_people=10)
    plain = generate(tmp_path / "plain", **kw)
    # The default style is no style: the same bytes.
    assert generate(tmp_path / "default", **kw, style=SceneStyle()).read_bytes() == plain.read_bytes()
    grouped = generate(tmp_path / "grouped", **kw, style=SceneStyle(groups=1))
    small = generate(tmp_path / "small", **kw, style=SceneStyle(figure_scale=0.5))
    street = generate(
        tmp_path / "street", **kw, background="street", style=SceneStyle(palette="dusk", poses="varied")
    )
    for odgt in (grouped, small, street):
        for g in _persons(odgt):  # the visible part within the figure, whatever the pose
            fx, fy, fw, fh = g["fbox"]
            vx, vy, vw, vh = g["vbox"]
            assert fx <= vx and fy <= vy and vx + vw <= fx + fw and vy + vh <= fy + fh
    # Standing in one group hides more of each other than standing anywhere.
    occluded = {
        name: sum(g["extra"]["occ"] for g in _persons(o)) / len(_persons(o))
        for name, o in (("plain", plain), ("grouped", grouped))
    }
    assert occluded["grouped"] > occluded["plain"]
    # Half the scale: figures of about half the height.
    height = {
        name: sum(g["fbox"][3] for g in _persons(o)) / len(_persons(o))
        for name, o in (("plain", plain), ("small", small))
    }
    assert 0.4 < height["small"] / height["plain"] < 0.6

    # The dusk palette is darker: mean brightness of the images.
    def brightness(folder):
        return sum(
            float(torch.tensor(list(Image.open(p).convert("L").getdata()), dtype=torch.float32).mean())
            for p in sorted((folder / "Images").iterdir())
        )

    assert brightness(tmp_path / "street") < brightness(tmp_path / "plain")
    for bad in (dict(palette="neon"), dict(poses="dance"), dict(figure_scale=0.0), dict(groups=-1)):
        with pytest.raises(ValueError):
            SceneStyle(**bad)


def test_command_line_scene_flags(tmp_path, capsys):
    args = [
        "--n",
        "1",
        "--seed",
        "3",
        "--width",
        "96",
        "--height",
        "64",
        "--min-people",
        "4",
        "--max-people",
        "6",
    ]
    scene = [
        "--background",
        "street",
        "--palette",
        "pastel",
        "--poses",
        "varied",
        "--figure-scale",
        "0.8",
        "--groups",
        "2",
    ]
    main(["--out", str(tmp_path / "a"), *args, *scene])
    main(["--out", str(tmp_path / "b"), *args])
    a, b = (tmp_path / x / "Images/synthetic_3_000000.jpg" for x in "ab")
    assert a.read_bytes() != b.read_bytes()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "c"), *args, "--figure-scale", "3"])
    assert "figure_scale" in capsys.readouterr().err
