"""A source split in two by image id: a held-out part to choose on, and the rest to train on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Literal

from dip_r1.data.sample import DetectionSample
from dip_r1.data.stream import DetectionSource


class HoldOut:
    """The ``"held_out"`` part of a source, or the ``"rest"`` of it, split by a hash of each image id.

    About ``fraction`` of the images are held out. The two parts of the same ``source``, ``fraction`` and
    ``seed`` never share an image and together hold every one, whatever the order the source reads in: e.g.
    CrowdHuman train as training images (``part: rest``) and as a validation set to choose checkpoints and
    settings on (``part: held_out``), leaving CrowdHuman val for the test.

    Args:
        source: the source to split (any iterable of DetectionSample).
        part: ``"held_out"`` or ``"rest"``.
        fraction: the share of images held out, in (0, 1).
        seed: another seed, another split.
        name: dataset name in metrics (default: the source's).
    """

    def __init__(
        self,
        source: DetectionSource,
        part: Literal["held_out", "rest"] = "rest",
        fraction: float = 0.05,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        if part not in ("held_out", "rest"):
            raise ValueError(f"part must be 'held_out' or 'rest', got {part!r}")
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
        self.source, self.part, self.fraction, self.seed = source, part, fraction, seed
        self.name = name if name is not None else getattr(source, "name", type(source).__name__.lower())

    @property
    def skipped(self):
        """What the source's reader skipped (the stream reports it)."""
        return getattr(self.source, "skipped", None)

    def held_out(self, image_id: str) -> bool:
        """Whether ``image_id`` is in the held-out part.

        >>> split = HoldOut([], fraction=0.5)
        >>> [split.held_out(str(i)) for i in range(6)]
        [False, False, False, True, True, False]
        """
        digest = hashlib.sha256(f"{self.seed}:{image_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.fraction

    def __iter__(self) -> Iterator[DetectionSample]:
        keep = self.part == "held_out"
        return (s for s in self.source if self.held_out(s.image_id) == keep)
