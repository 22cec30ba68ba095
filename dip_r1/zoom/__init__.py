"""The zoom look: the regions a completion writes in ``<look>`` are cropped from the source image and shown
to the model, as images, before it answers; an answer box may be read off a crop (``"region": k``).

:mod:`~dip_r1.zoom.geometry` says where a crop is and how its frame maps to the image's;
:mod:`~dip_r1.zoom.crops` opens a completion's crops during a rollout and :mod:`~dip_r1.zoom.insert` appends them
to its sequence; :mod:`~dip_r1.zoom.answers` maps an answer's boxes read off a crop back to the image frame;
:mod:`~dip_r1.zoom.targets` writes the teacher completions that use crops.
"""

from dip_r1.zoom.answers import resolve_regions
from dip_r1.zoom.crops import Zoom, zoom_of
from dip_r1.zoom.geometry import CropGeometry, crop_regions
from dip_r1.zoom.targets import ZoomTarget, zoom_target

__all__ = ["CropGeometry", "Zoom", "ZoomTarget", "crop_regions", "resolve_regions", "zoom_of", "zoom_target"]
