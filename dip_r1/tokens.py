"""The special token ids every decoder needs: where a completion ends, what pads it, what is never sampled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

_PLACEHOLDERS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclass(frozen=True)
class TokenIds:
    """Token ids of one policy and its processor.

    >>> t = TokenIds(eos=(2, 3), pad=0, never_sampled=(0, 7))
    >>> t.eos[0], t.pad
    (2, 0)
    """

    eos: tuple[int, ...]
    """Every id that ends a completion: published Qwen folders list several in their generation config
    (``<|im_end|>`` and ``<|endoftext|>``), the tokenizer's EOS among them or not."""
    pad: int
    """The id completions are padded with after their EOS (the tokenizer's pad, else the first EOS)."""
    never_sampled: tuple[int, ...]
    """Image / video placeholders (an image token in a completion would no longer match the image features
    when the completion is scored), and the pad id unless it is an EOS (a sampled pad would be masked as
    padding, leaving a hole in the completion)."""
    image: tuple[int, int, int] | None = None
    """``(vision start, image pad, vision end)``: how the family spells an image in a sequence (an image of
    ``n`` merged patches is start, ``n`` pads, end), read from the model's config
    (``vision_start_token_id``, ``image_token_id``, ``vision_end_token_id``); None when it names none.
    The zoom look inserts its crops with them."""

    @classmethod
    def of(cls, model: nn.Module | None, processor: Any) -> TokenIds:
        """The ids of ``model`` (its config and generation config; None: the processor's alone)."""
        tokenizer = getattr(processor, "tokenizer", processor)
        eos = model.generation_config.eos_token_id if model is not None else None
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        eos = list(dict.fromkeys(i for i in [*eos, tokenizer.eos_token_id] if i is not None))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        config = model.config if model is not None else None
        ids = {getattr(config, n, None) for n in _PLACEHOLDERS} | {
            getattr(processor, n, None) for n in _PLACEHOLDERS
        }
        placeholders = {i for i in ids if isinstance(i, int)}
        never = placeholders | (set() if pad in eos else {pad})
        image = tuple(
            _config_id(model, processor, n)
            for n in ("vision_start_token_id", "image_token_id", "vision_end_token_id")
        )
        return cls(
            eos=tuple(eos),
            pad=pad,
            never_sampled=tuple(sorted(never)),
            image=image if all(isinstance(i, int) for i in image) else None,
        )


def _config_id(model: nn.Module | None, processor: Any, name: str) -> int | None:
    """A special token id from the model's config (or its text config), else the processor's attribute."""
    config = model.config if model is not None else None
    for owner in (config, getattr(config, "text_config", None), processor):
        value = getattr(owner, name, None)
        if isinstance(value, int):
            return value
    return None
