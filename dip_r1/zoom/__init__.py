"""The zoom look: the regions a completion writes in ``<look>`` are cropped from the source image and shown
to the model, as images, before it answers; an answer box may be read off a crop (``"region": k``).

:mod:`~dip_r1.zoom.geometry` says where a crop is and how its frame maps to the image's.
"""

from dip_r1.zoom.geometry import CropGeometry, crop_regions

__all__ = ["CropGeometry", "crop_regions"]
