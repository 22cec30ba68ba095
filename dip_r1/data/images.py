"""Decoding images, and a source of unannotated images for prediction."""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from dip_r1.data.sample import DetectionSample

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What PIL raises for a corrupt, truncated or unreadable file (FileNotFoundError is an OSError)."""


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully into memory as RGB; raises one of :data:`DECODE_ERRORS` when unreadable."""
    with Image.open(path) as image:
        # convert() forces the full decode here, so a truncated file fails now, not later in a batch.
        return image.convert("RGB")


class ImageFolder:
    """Images without annotation (for ``predict``): every image in a folder, or the files a glob matches."""

    name = "images"

    def __init__(self, pattern: str | Path) -> None:
        """
        Args:
            pattern: A folder (its images, sorted by name, not recursive) or a glob such as ``photos/*.jpg``.
        """
        self.pattern = str(pattern)

    def paths(self) -> list[Path]:
        """The image files, sorted; none is an error (a mistyped path would otherwise predict on nothing)."""
        root = Path(self.pattern)
        if root.is_dir():
            found = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found = sorted(Path(p) for p in glob.glob(self.pattern, recursive=True))
        if not found:
            raise FileNotFoundError(f"no images at {self.pattern!r}: expected a folder of images or a glob")
        return found

    def __iter__(self) -> Iterator[DetectionSample]:
        for path in self.paths():
            yield DetectionSample(image_id=path.stem, image_path=path, width=0, height=0)
