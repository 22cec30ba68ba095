"""Dataset readers: iterables of :class:`~dip_r1.data.sample.DetectionSample` built from annotation files.

Every reader reads its annotations lazily, never opens an image and never writes to the dataset
folder; bad input is skipped, counted in ``reader.skipped`` and warned about (``strict=True``
raises instead). A new dataset is any class iterating ``DetectionSample``. :class:`SyntheticCrowd` is the
exception that writes: it generates its synthetic set under its own root on first use. :class:`HoldOut` splits a
source in two by image id (a validation part and the rest).
"""

from dip_r1.data.sources.citypersons import CityPersons
from dip_r1.data.sources.coco import COCO
from dip_r1.data.sources.crowdhuman import CrowdHuman
from dip_r1.data.sources.jsonlines import JSONLines
from dip_r1.data.sources.split import HoldOut
from dip_r1.data.sources.synthetic import SyntheticCrowd
from dip_r1.data.sources.uavdt import UAVDT
from dip_r1.data.sources.wider_pedestrian import WiderPedestrian
from dip_r1.data.sources.widerperson import WiderPerson

__all__ = [
    "COCO",
    "UAVDT",
    "CityPersons",
    "CrowdHuman",
    "HoldOut",
    "JSONLines",
    "SyntheticCrowd",
    "WiderPedestrian",
    "WiderPerson",
]
