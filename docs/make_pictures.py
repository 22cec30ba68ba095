"""Draw the README's picture from the synthetic crowd set: ``python docs/make_pictures.py`` -> docs/pictures.png.

Left, what ``dip-r1 predict`` draws (:func:`dip_r1.viz.draw_detections`); right, what the ``GroupPictures``
callback logs (:func:`dip_r1.viz.draw_group`). The answers are simulated (ground truth jittered, some boxes
dropped, one false box added, seeded), so the picture shows the rendering, not a trained model's quality.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image

from dip_r1 import viz
from dip_r1.data.images import open_rgb
from dip_r1.quickstart import SyntheticCrowd


def simulated_answer(
    gt: torch.Tensor, generator: torch.Generator, drop: float, jitter: float
) -> torch.Tensor:
    """Ground-truth boxes, each kept with probability ``1 - drop`` and moved by up to ``jitter`` of its size."""
    keep = torch.rand(len(gt), generator=generator) >= drop
    boxes = gt[keep]
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + (torch.rand(boxes.shape, generator=generator) * 2 - 1) * jitter * size


def main(out: Path, seed: int = 1, group_size: int = 6) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        source = SyntheticCrowd(tmp, n=1, seed=seed, width=320, height=240, min_people=7, max_people=10)
        sample = next(iter(source))
        image = open_rgb(sample.image_path)
    g = torch.Generator().manual_seed(seed)
    gt, ignore = sample.boxes, sample.ignore
    false_box = torch.tensor([[250.0, 20, 290, 70]])
    answer = torch.cat([simulated_answer(gt, g, drop=0.2, jitter=0.04), false_box])
    scores = torch.log(torch.rand(len(answer), generator=g) * 0.5 + 0.5)
    look = answer[:2] + torch.tensor([-6.0, -6, 6, 6])
    left = viz.draw_detections(image, answer, scores, look=look, gt=gt, ignore=ignore)
    answers = [simulated_answer(gt, g, drop=0.2, jitter=0.06) for _ in range(group_size)]
    looks = [a[torch.randperm(len(a), generator=g)[:1]] + torch.tensor([-8.0, -8, 8, 8]) for a in answers]
    right = viz.draw_group(image, answers, looks, image.size, grid=32)
    picture = Image.new("RGB", (left.width + 4 + right.width, left.height), (255, 255, 255))
    picture.paste(left, (0, 0))
    picture.paste(right, (left.width + 4, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, optimize=True)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "pictures.png")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(main(args.out, args.seed))
