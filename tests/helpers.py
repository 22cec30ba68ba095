"""Helpers shared by tests (importable as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import torch
from PIL import Image


def prompt_batch(processor, sizes=((56, 56), (84, 56))) -> dict:
    """A left-padded processor batch of one image prompt per size (prompts of different lengths)."""
    processor.tokenizer.padding_side = "left"
    texts, images = [], []
    for i, (w, h) in enumerate(sizes):
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Detect" + " people" * i}],
            }
        ]
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        images.append(Image.new("RGB", (w, h), (40 * i, 200, 90)))
    return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))


def toy_targets(n: int) -> list[dict]:
    return [{"boxes": torch.zeros(0, 4), "ignore": torch.zeros(0, 4), "image_size": (1000, 1000)}] * n


class Repeat(torch.utils.data.IterableDataset):
    """One batch, forever: a DataLoader (``batch_size=None``) for training on a fixed batch."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch
