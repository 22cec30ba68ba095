"""``python -m dip_r1.pretrain``: build the tiny base that sees (:mod:`dip_r1.tiny.pretrain`).

Recipes name its builder here (``class_path: dip_r1.pretrain.TinyPretrain``).
"""

from dip_r1.tiny.curriculum import TINY_SYSTEM_PROMPT
from dip_r1.tiny.pretrain import TinyPretrain, main, pretrain

__all__ = ["TINY_SYSTEM_PROMPT", "TinyPretrain", "main", "pretrain"]

if __name__ == "__main__":
    main()
