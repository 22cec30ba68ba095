"""Synthetic crowd scenes in CrowdHuman format, for the quickstart and the tests.

``python -m dip_r1.data.synthetic --out data/synthetic-crowd --n 200 --seed 0`` writes
``<out>/Images/<ID>.jpg`` and ``<out>/annotation.odgt``, readable by
``CrowdHuman("<out>/annotation.odgt", "<out>/Images")``. Each image holds many overlapping
person-like figures (a head disc on a body, varied sizes and colours) drawn far to near, so nearer
figures occlude farther ones: ``fbox`` is the whole figure, ``vbox`` the bounding box of its
visible pixels, ``hbox`` its head; figures less than 10% visible carry ``extra.ignore = 1``, fully
hidden ones are not annotated. About half the images hold a distant crowd of tiny figures
annotated as one ``tag == "mask"`` region. Same seed, same files (a generator per image).

What is in a scene can change beside its size and head count, for out-of-domain sets: ``background="clutter"``
adds person-sized distractors (posts, boxes, discs) behind the figures, ``"street"`` building fronts with
windows and lamp posts; a :class:`SceneStyle` sets the palette, the poses, the figures' scale and whether they
stand in tight groups (heavier occlusion). The defaults draw the images of earlier versions, byte for byte.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SKIN = [(255, 220, 177), (229, 184, 143), (198, 134, 66), (141, 85, 36), (90, 56, 37)]
"""Head colours."""
HEAD = 0.09
"""Head radius as a fraction of figure height."""
MIN_VISIBLE = 0.1
"""Figures with a smaller visible fraction are marked ``extra.ignore = 1``."""
BACKGROUNDS = ("plain", "clutter", "street")
"""Background styles: sky and ground only; with unannotated distractor shapes; with building fronts and posts."""
PALETTES = ("any", "dusk", "pastel")
"""Colour palettes: any colour; dark, low-contrast, blue-tinted colours; light washed-out colours."""
POSES = ("standing", "varied")
"""Figures stand upright, or each takes one of standing, arms out and striding."""


@dataclass(frozen=True)
class SceneStyle:
    """What a scene holds beyond its size and head count (the defaults: the images of earlier versions)."""

    palette: str = "any"
    """Colours of sky, ground, clothes and distractors (:data:`PALETTES`)."""
    poses: str = "standing"
    """``"standing"`` figures, or ``"varied"``: arms out and striding ones too (:data:`POSES`)."""
    figure_scale: float = 1.0
    """Figure heights times this (< 1: smaller figures, as in a farther or denser crowd), in (0, 2]."""
    groups: int = 0
    """Figures stand in this many tight groups, which overlap more (0: anywhere on the ground)."""

    def __post_init__(self) -> None:
        if self.palette not in PALETTES:
            raise ValueError(f"palette must be one of {PALETTES}, got {self.palette!r}")
        if self.poses not in POSES:
            raise ValueError(f"poses must be one of {POSES}, got {self.poses!r}")
        if not 0 < self.figure_scale <= 2:
            raise ValueError(f"figure_scale must lie in (0, 2], got {self.figure_scale}")
        if self.groups < 0:
            raise ValueError(f"groups must be >= 0, got {self.groups}")


def _head(draw: ImageDraw.ImageDraw, x: float, y: float, w: float, h: float, colour) -> None:
    """The head disc of the figure in box ``x, y, w, h``."""
    r, cx = HEAD * h, x + w / 2
    draw.ellipse([cx - r, y, cx + r, y + 2 * r], fill=colour)


def _figure(
    draw: ImageDraw.ImageDraw, x: float, y: float, w: float, h: float, colours: tuple, pose: int = 0
) -> None:
    """A person-like figure filling the box ``x, y, w, h``: head disc, torso, two legs; ``pose`` 1 spreads
    both arms to the box's sides (the torso narrower), 2 strides (legs apart at the feet)."""
    head, shirt, trousers = colours
    r = HEAD * h
    _head(draw, x, y, w, h, head)
    leg = 0.38 * w
    if pose == 1:
        arm = max(1.0, 0.06 * h)
        draw.rectangle([x, y + 2.4 * r, x + w, y + 2.4 * r + arm], fill=shirt)
        x, w = x + 0.2 * w, 0.6 * w  # the torso and legs of a narrower figure under the arms
        leg = 0.38 * w
    draw.rounded_rectangle([x, y + 2 * r, x + w, y + 0.6 * h], radius=max(1.0, w / 4), fill=shirt)
    if pose == 2:
        hip = y + 0.6 * h
        draw.polygon(
            [(x + 0.1 * w, hip), (x + 0.1 * w + leg, hip), (x + leg * 0.9, y + h), (x, y + h)], fill=trousers
        )
        right = x + 0.9 * w
        draw.polygon(
            [(right - leg, hip), (right, hip), (x + w, y + h), (x + w - leg * 0.9, y + h)], fill=trousers
        )
        return
    draw.rectangle([x + 0.08 * w, y + 0.6 * h, x + 0.08 * w + leg, y + h], fill=trousers)
    draw.rectangle([x + 0.92 * w - leg, y + 0.6 * h, x + 0.92 * w, y + h], fill=trousers)


def _colour(rng: np.random.Generator, palette: str = "any") -> tuple[int, int, int]:
    c = rng.integers(0, 256, size=3)
    if palette == "dusk":  # dark and close together, tinted blue
        c = c * 0.35 + np.array([15, 20, 45])
    elif palette == "pastel":  # light and washed out
        c = 150 + c * 0.4
    return tuple(int(v) for v in c)


def _street(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, horizon: int, palette: str
) -> None:
    """Building fronts along the horizon, each with a grid of windows, and thin lamp posts: never annotated."""
    x = -rng.uniform(0, width / 6)
    while x < width:
        w, h = rng.uniform(0.15, 0.35) * width, rng.uniform(0.5, 1.0) * horizon
        draw.rectangle([x, horizon - h, x + w, horizon], fill=_colour(rng, palette))
        window, gap = max(1.0, w / 10), max(2.0, w / 6)
        glass = _colour(rng, palette)
        for wy in np.arange(horizon - h + gap / 2, horizon - window, gap):
            for wx in np.arange(x + gap / 2, x + w - window, gap):
                draw.rectangle([wx, wy, wx + window, wy + window], fill=glass)
        x += w + rng.uniform(0, width / 20)
    for _ in range(int(rng.integers(1, 4))):
        px, top = rng.uniform(0, width), horizon * rng.uniform(0.2, 0.6)
        draw.rectangle(
            [px, top, px + max(1.0, width / 120), horizon + (horizon * 0.4)], fill=_colour(rng, palette)
        )


def _clutter(
    rng: np.random.Generator,
    draw: ImageDraw.ImageDraw,
    width: int,
    height: int,
    horizon: int,
    palette: str = "any",
) -> None:
    """Distractors standing on the ground, about a figure's size: posts, boxes and discs, never annotated."""
    for _ in range(int(rng.integers(3, 9))):
        foot = rng.uniform(horizon, height)
        h = max(2.0, (foot - horizon) * rng.uniform(0.3, 1.0))
        w = h * rng.uniform(0.15, 1.2)
        x = rng.uniform(-w / 2, width - w / 2)
        box = [x, foot - h, x + w, foot]
        shape = rng.integers(3)
        if shape == 0:
            draw.rectangle(box, fill=_colour(rng, palette))
        elif shape == 1:
            draw.ellipse(box, fill=_colour(rng, palette))
        else:
            draw.rounded_rectangle(box, radius=max(1.0, w / 3), fill=_colour(rng, palette))


def _within(rng: np.random.Generator, value: float, low: float, high: float) -> float:
    """``value`` if inside ``(low, high)``, else a uniform draw there: clipping would put figures on exact pixel
    edges, where the crop that measures a figure's own pixels can round one pixel otherwise than the scene."""
    return float(value) if low < value < high else float(rng.uniform(low, high))


def _scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    min_people: int,
    max_people: int,
    background: str = "plain",
    style: SceneStyle = SceneStyle(),  # noqa: B008 (frozen)
):
    """Draw one image; return it and its CrowdHuman ``gtboxes``.

    Random numbers are drawn for a style only when it differs from the default, so default scenes stay those
    of earlier versions.
    """
    palette = style.palette
    image = Image.new("RGB", (width, height), _colour(rng, palette))
    draw = ImageDraw.Draw(image)
    horizon = int(height * rng.uniform(0.3, 0.45))
    if background == "street":  # behind the ground's edge
        _street(rng, draw, width, horizon, palette)
    draw.rectangle([0, horizon, width, height], fill=_colour(rng, palette))
    if background == "clutter":  # drawn only then: "plain" images stay those of earlier versions
        _clutter(rng, draw, width, height, horizon, palette)
    ids = Image.new("L", (width, height), 0)  # which figure (1-based) owns each pixel
    id_draw = ImageDraw.Draw(ids)
    gtboxes = []
    if rng.random() < 0.5:  # a distant crowd: too small and dense to annotate one by one
        cw, ch = int(width * rng.uniform(0.25, 0.5)), int(height * rng.uniform(0.08, 0.14))
        cx0, cy0 = int(rng.integers(0, width - cw)), horizon - ch // 2
        for _ in range(int(cw * ch / 25)):
            fh = rng.uniform(0.6, 1.0) * ch
            fx, fy = rng.uniform(cx0, cx0 + cw - fh * 0.4), rng.uniform(cy0, cy0 + ch - fh)
            colours = (SKIN[rng.integers(len(SKIN))], _colour(rng, palette), _colour(rng, palette))
            _figure(draw, fx, fy, fh * 0.4, fh, colours)
        region = [cx0, cy0, cw, ch]
        gtboxes.append(
            {"tag": "mask", "fbox": region, "vbox": region, "hbox": region, "extra": {"ignore": 1}}
        )
    ground = horizon + 0.15 * height
    centres = [(rng.uniform(0, width), rng.uniform(ground, height)) for _ in range(style.groups)]
    people = []
    for _ in range(int(rng.integers(min_people, max_people + 1))):
        if centres:  # near one group's centre: neighbours overlap
            cx, cfoot = centres[int(rng.integers(len(centres)))]
            foot = _within(rng, cfoot + rng.normal(0, 0.06 * height), ground, height)
        else:
            foot = rng.uniform(ground, height)
        h = min(foot, (foot - horizon) * rng.uniform(0.6, 1.1))  # perspective: nearer is taller
        w = h * rng.uniform(0.3, 0.45)
        if style.figure_scale != 1.0:
            h, w = h * style.figure_scale, w * style.figure_scale
        if centres:
            x = _within(rng, cx - w / 2 + rng.normal(0, 0.05 * width), 0, width - w)
        else:
            x = rng.uniform(0, width - w)
        colours = (SKIN[rng.integers(len(SKIN))], _colour(rng, palette), _colour(rng, palette))
        pose = int(rng.integers(3)) if style.poses == "varied" else 0
        people.append((foot, x, h, w, colours, pose))
    people.sort(key=lambda p: p[0])  # far to near: later figures occlude earlier ones
    for index, (foot, x, h, w, colours, pose) in enumerate(people, start=1):
        _figure(draw, x, foot - h, w, h, colours, pose)
        _figure(id_draw, x, foot - h, w, h, (index, index, index), pose)
    owner = np.asarray(ids)
    for index, (foot, x, h, w, _, pose) in enumerate(people, start=1):
        gt = _annotate(owner, index, x, foot - h, w, h, len(gtboxes), pose)
        if gt is not None:
            gtboxes.append(gt)
    return image, gtboxes


def _pixel_box(mask: np.ndarray, dx: int = 0, dy: int = 0) -> list[int] | None:
    """``[x, y, w, h]`` of the set pixels of a mask shifted by ``dx, dy`` (a pixel spans one unit)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return [
        int(cols.min()) + dx,
        int(rows.min()) + dy,
        int(cols.max() - cols.min() + 1),
        int(rows.max() - rows.min() + 1),
    ]


def _alone(
    size: tuple[int, int], x: float, y: float, w: float, h: float, head_only: bool, pose: int = 0
) -> np.ndarray:
    """The pixels of a ``size`` crop that figure ``x, y, w, h`` (or its head) covers when nothing hides it."""
    image = Image.new("1", size, 0)
    draw = ImageDraw.Draw(image)
    if head_only:
        _head(draw, x, y, w, h, 1)
    else:
        _figure(draw, x, y, w, h, (1, 1, 1), pose)
    return np.asarray(image)


def _annotate(
    owner: np.ndarray, index: int, x: float, y: float, w: float, h: float, box_id: int, pose: int = 0
) -> dict | None:
    """CrowdHuman ``gtboxes`` entry of figure ``index`` from the pixel-owner map, or None if hidden.

    Boxes are measured on the drawn pixels, so ``vbox`` and ``hbox`` always lie inside ``fbox``.
    Work happens in a crop around the figure (drawing rounds outwards by at most a pixel).
    """
    x0, y0 = max(int(x) - 2, 0), max(int(y) - 2, 0)
    x1, y1 = min(int(x + w) + 3, owner.shape[1]), min(int(y + h) + 3, owner.shape[0])
    visible = owner[y0:y1, x0:x1] == index
    vbox = _pixel_box(visible, x0, y0)
    if vbox is None:
        return None
    size = (x1 - x0, y1 - y0)
    full = _alone(size, x - x0, y - y0, w, h, head_only=False, pose=pose)
    head = _alone(size, x - x0, y - y0, w, h, head_only=True)
    fraction = visible.sum() / max(int(full.sum()), 1)
    head_fraction = (visible & head).sum() / max(int(head.sum()), 1)
    return {
        "tag": "person",
        "fbox": _pixel_box(full, x0, y0),
        "vbox": vbox,
        "hbox": _pixel_box(head, x0, y0),
        "extra": {"box_id": box_id, "occ": int(fraction < 0.95), "ignore": int(fraction < MIN_VISIBLE)},
        "head_attr": {"ignore": 0, "occ": int(head_fraction < 0.95), "unsure": 0},
    }


def generate(
    out: str | Path,
    n: int,
    seed: int,
    width: int = 320,
    height: int = 240,
    min_people: int = 6,
    max_people: int = 24,
    quality: int = 90,
    background: str = "plain",
    style: SceneStyle | None = None,
) -> Path:
    """Write ``n`` synthetic crowd images and their ``annotation.odgt`` under ``out``; return the ``.odgt`` path.

    Args:
        out: output folder (created); images go to ``<out>/Images/<ID>.jpg``.
        n: number of images.
        seed: random seed; the same seed gives the same files.
        width: image width in pixels.
        height: image height in pixels.
        min_people: fewest annotated-or-not figures per image.
        max_people: most figures per image.
        quality: JPEG quality.
        background: ``"plain"`` (sky and ground), ``"clutter"`` (plus unannotated distractor shapes) or
            ``"street"`` (plus building fronts and lamp posts).
        style: palette, poses, figure scale and grouping (:class:`SceneStyle`; default: the plain style).
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    if not 0 < min_people <= max_people or max_people > 250:  # owner map is 8-bit
        raise ValueError(f"need 0 < min_people <= max_people <= 250, got {min_people}, {max_people}")
    out = Path(out)
    (out / "Images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])  # one stream per image: any image regenerates alone
        image, gtboxes = _scene(rng, width, height, min_people, max_people, background, style or SceneStyle())
        image_id = f"synthetic_{seed}_{i:06d}"
        image.save(out / "Images" / f"{image_id}.jpg", quality=quality)
        lines.append(json.dumps({"ID": image_id, "gtboxes": gtboxes}))
    path = out / "annotation.odgt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m dip_r1.data.synthetic --out DIR --n N --seed S`` (and the scene's flags)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n", type=int, default=200, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--width", type=int, default=320, help="image width")
    parser.add_argument("--height", type=int, default=240, help="image height")
    parser.add_argument("--min-people", type=int, default=6, help="fewest figures per image")
    parser.add_argument("--max-people", type=int, default=24, help="most figures per image")
    parser.add_argument("--background", default="plain", choices=BACKGROUNDS, help="background style")
    parser.add_argument("--palette", default="any", choices=PALETTES, help="colours of the scene")
    parser.add_argument("--poses", default="standing", choices=POSES, help="figures' poses")
    parser.add_argument(
        "--figure-scale", type=float, default=1.0, help="figure heights times this, in (0, 2]"
    )
    parser.add_argument("--groups", type=int, default=0, help="figures stand in this many tight groups")
    args = parser.parse_args(argv)
    try:
        style = SceneStyle(args.palette, args.poses, args.figure_scale, args.groups)
    except ValueError as exc:
        parser.error(str(exc))
    path = generate(
        args.out,
        args.n,
        args.seed,
        args.width,
        args.height,
        args.min_people,
        args.max_people,
        background=args.background,
        style=style,
    )
    print(path)


if __name__ == "__main__":
    main()
