"""Detection data: samples, dataset readers, prompts and the DataModule."""

from dip_r1.data.sample import DetectionSample

__all__ = ["DetectionSample"]
