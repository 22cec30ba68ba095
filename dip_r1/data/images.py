"""Decoding images, and a source of unannotated images for prediction."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from dip_r1.data.sample import DetectionSample
from dip_r1.preflight import MissingInput

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What PIL raises for a corrupt, truncated or unreadable file (FileNotFoundError is an OSError)."""


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully into memory as RGB; raises one of :data:`DECODE_ERRORS` when unreadable."""
    with Image.open(path) as image:
        # convert() forces the full decode here, so a truncated file fails now, not later in a batch.
        return image.convert("RGB")


class ImageFolder:
    """Images without annotation (for ``predict``): every image in a folder, or the files a glob matches.

    Each sample's ``image_id`` is its path relative to the folder all matched images share (``a/x.jpg``,
    ``b/x.jpg``, ``x.png``), so that images of the same name in different folders stay apart.
    """

    name = "images"

    def __init__(self, pattern: str | Path) -> None:
        """
        Args:
            pattern: A folder (its images, sorted by name, not recursive) or a glob such as ``photos/*.jpg``.
        """
        self.pattern = str(pattern)
        self.paths()  # a pattern that matches nothing stops the run here, before any weights load

    def paths(self) -> list[Path]:
        """The image files, sorted; none is an error (a mistyped path would otherwise predict on nothing)."""
        root = Path(self.pattern)
        if root.is_dir():
            found = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found = sorted(Path(p) for p in glob.glob(self.pattern, recursive=True) if Path(p).is_file())
        if not found:
            raise MissingInput(
                "images",
                self.pattern,
                "no images there",
                "give a folder of images or a glob such as 'photos/*.jpg' to --data.predict_images",
            )
        return found

    def __iter__(self) -> Iterator[DetectionSample]:
        paths = self.paths()
        root = Path(os.path.commonpath([p.parent.absolute() for p in paths]))
        for path in paths:
            image_id = path.absolute().relative_to(root).as_posix()
            yield DetectionSample(image_id=image_id, image_path=path, width=0, height=0)
