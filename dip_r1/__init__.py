"""dip_r1: GRPO fine-tuning of multimodal LLMs for deep inspection and perception in crowded scenes."""

__version__ = "0.1.0"
