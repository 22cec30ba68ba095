"""The synthetic crowd set (:mod:`dip_r1.data.synthetic`) as a source that generates itself on first use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dip_r1.data.sample import DetectionSample
from dip_r1.data.sources.crowdhuman import CrowdHuman
from dip_r1.data.synthetic import SceneStyle, generate
from dip_r1.files import built_aside


class SyntheticCrowd:
    """The synthetic crowd set as a source, generated under ``root`` on first use (then only read)."""

    def __init__(
        self,
        root: str = "data/synthetic-crowd",
        n: int = 200,
        seed: int = 0,
        width: int = 320,
        height: int = 240,
        min_people: int = 6,
        max_people: int = 24,
        name: str = "synthetic",
        background: str = "plain",
        style: SceneStyle | None = None,
    ) -> None:
        """
        Args:
            root: folder of the set (``annotation.odgt`` and ``Images/``); generated when missing.
            n: number of images to generate.
            seed: seed of the generator.
            width: image width in pixels.
            height: image height in pixels.
            min_people: fewest figures per image.
            max_people: most figures per image.
            name: dataset name in metrics.
            background: ``"plain"``, ``"clutter"`` (distractor shapes) or ``"street"`` (building fronts); see
                ``dip_r1.data.synthetic``.
            style: palette, poses, figure scale and grouping (:class:`~dip_r1.data.synthetic.SceneStyle`).
        """
        self.root = Path(root)
        self.name = name
        self._args = dict(
            n=n,
            seed=seed,
            width=width,
            height=height,
            min_people=min_people,
            max_people=max_people,
            background=background,
            style=style,
        )

    def _reader(self) -> CrowdHuman:
        annotation = self.root / "annotation.odgt"
        if not annotation.is_file():
            # a set interrupted half-way is never mistaken for a whole one
            with built_aside(self.root) as tmp:
                generate(tmp, **self._args)
        return CrowdHuman(annotation, self.root / "Images", name=self.name)

    def __iter__(self) -> Iterator[DetectionSample]:
        return iter(self._reader())
