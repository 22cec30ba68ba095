"""Where the recipes find the quickstart's pieces: :class:`SyntheticCrowd` (a source that generates its set on
first use, :mod:`dip_r1.data.sources.synthetic`) and :class:`TinySFT` (a quick warm start,
:mod:`dip_r1.tiny.warm_start`). ``class_path: dip_r1.quickstart.SyntheticCrowd`` and the source's own path
name the same class."""

from dip_r1.data.sources.synthetic import SyntheticCrowd
from dip_r1.tiny.warm_start import TinySFT

__all__ = ["SyntheticCrowd", "TinySFT"]
