"""A zoom batch whose completions are forced to write a look first (a random tiny model never closes
``</look>`` on its own), for the zoom tests (importable as ``zoom_tools``: pytest puts tests/ on the path)."""

from __future__ import annotations

import torch
from PIL import Image

import dip_r1.rollout
from dip_r1.config import SamplingConfig
from dip_r1.data.prompts import DetectionPromptBuilder
from dip_r1.data.sample import DetectionSample
from dip_r1.zoom.crops import Zoom

LOOKS = ("[[0, 0, 500, 500], [600, 100, 900, 700]]", "[[100, 100, 300, 260]]", "[]")
"""The looks the forced completions write (0..1000 of the image): two crops, one, none."""


def zoom_batch(
    processor, coordinates: str, sizes=((320, 240), (200, 300)), boxes=((10.0, 10, 50, 90),)
) -> tuple[dict, list, list]:
    """``(inputs, sources, targets)``: one prompt per size, striped images larger than the 160x120 budget, each
    annotated with ``boxes`` (source pixels)."""
    processor.tokenizer.padding_side = "left"
    builder = DetectionPromptBuilder(coordinates=coordinates, max_pixels=160 * 120, system_prompt="Detect.")
    builder.configure(image_processor=processor.image_processor, keep_source=True)
    prompts = []
    for i, (w, h) in enumerate(sizes):
        image = Image.new("RGB", (w, h), (40 * i, 200, 90))
        for x in range(0, w, 20):
            image.paste((x % 255, 30, 200), (x, 0, x + 10, h))
        sample = DetectionSample(
            image_path="x.jpg",
            image_id=str(i),
            width=w,
            height=h,
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            labels=["person"] * len(boxes),
        )
        prompts.append(builder.build(sample, image, dataset="zoom"))
    texts = [
        processor.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    inputs = dict(processor(text=texts, images=[p.image for p in prompts], padding=True, return_tensors="pt"))
    return inputs, [p.source for p in prompts], [p.target for p in prompts]


def scripts(tokenizer, rows: int, looks=LOOKS) -> list[list[int]]:
    """Each row's forced start: thinks of different lengths (the rows close their looks at different columns),
    then a look of ``looks`` in turn."""
    out = []
    for r in range(rows):
        text = "<think>" + "a" * (r + 1) + "</think>\n<look>" + looks[r % len(looks)] + "</look>"
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def force_prefixes(monkeypatch, prefixes: list[list[int]]) -> None:
    """Make every rollout start row ``r`` with ``prefixes[r]``, then sample as configured."""
    sample = dip_r1.rollout._next_tokens

    def forced(logits, sampling, count):
        out = sample(logits, sampling, count)
        for r, prefix in enumerate(prefixes):
            k = int(count[r])
            if k < len(prefix):
                out[r] = prefix[k]
        return out

    monkeypatch.setattr(dip_r1.rollout, "_next_tokens", forced)


def zoom_rollout(model, processor, coordinates, monkeypatch, *, group_size=3, max_new_tokens=80, **sampling):
    """A zoom rollout of :func:`zoom_batch` with forced looks; returns ``(rollout, inputs, zoom)``."""
    from dip_r1.tokens import TokenIds

    inputs, sources, targets = zoom_batch(processor, coordinates)
    force_prefixes(monkeypatch, scripts(processor.tokenizer, len(sources) * group_size))
    tokens = TokenIds.of(model, processor)
    config = SamplingConfig(max_new_tokens=max_new_tokens, look_mode="zoom", **sampling)
    zoom = Zoom(sources, targets, processor, config, tokens)
    rollout = dip_r1.rollout.sample_completions(
        model, inputs, config, tokens, group_size=group_size, zoom=zoom, keep_logprobs=True
    )
    return rollout, inputs, zoom
