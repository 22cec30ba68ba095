"""Tiny models for tests, the quickstart and experiments: checkpoints built from configs with random weights
(:mod:`~dip_r1.tiny.checkpoints`, ``python -m dip_r1.tiny``), the base that learns to see
(:mod:`~dip_r1.tiny.pretrain`, ``python -m dip_r1.pretrain``) with its curriculum and grounding loss, and the
short SFT warm start (:class:`~dip_r1.tiny.warm_start.TinySFT`). Nothing in the training core imports them."""

from dip_r1.tiny.checkpoints import (
    CHAT_TEMPLATE,
    FAMILY_NAMES,
    SIZES,
    SPECIAL_TOKENS,
    build_config,
    build_tokenizer,
    main,
    save_tiny,
)

__all__ = [
    "CHAT_TEMPLATE",
    "FAMILY_NAMES",
    "SIZES",
    "SPECIAL_TOKENS",
    "build_config",
    "build_tokenizer",
    "main",
    "save_tiny",
]
