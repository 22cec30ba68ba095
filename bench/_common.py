"""What the GRPO step benchmarks share: the synthetic batch, memory counters, model shapes.

The scripts run as ``python bench/<name>.py``, so this module is imported by its bare name.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dip_r1.data.prompts import DEFAULT_SYSTEM_PROMPT

USER_PROMPT = "Detect every person in the image. Give each box in pixels of this image."
SHORT_PROMPT = "Detect every person in the image."  # the outside harness's: a user message, no system prompt


def messages(short: bool = False) -> list[dict]:
    """One conversation: the DIP-R1 system prompt, then an image and the detection request; ``short``: only
    the image and :data:`SHORT_PROMPT`."""
    # content blocks everywhere: a datasets table (TRL's input) cannot mix strings and lists in a column
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SHORT_PROMPT}]}
    if short:
        return [user]
    system = {"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]}
    return [system, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": USER_PROMPT}]}]


def images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    """``count`` seeded noise images of ``size`` x ``size`` pixels."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def prompt_inputs(processor, count: int, size: int, short: bool = False) -> dict:
    """A left-padded processor batch of ``count`` image prompts (the same text, different images)."""
    processor.tokenizer.padding_side = "left"
    text = processor.apply_chat_template(messages(short), tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text] * count, images=images(count, size), padding=True, return_tensors="pt"))


def flush_denormals() -> None:
    """Treat subnormal floats as zero on the CPU, in every benchmark process alike.

    A randomly initialised checkpoint produces subnormal activations, and x86 CPUs compute on them up to
    10x slower (measured here: a forward of the tiny model in 2.4 s instead of 0.21 s): the timings would
    measure that artefact, and unevenly, rather than the trainers.
    """
    import torch

    torch.set_flush_denormal(True)


def release_load_memory(model) -> None:
    """What ``load_policy`` does after a quantised CPU load, for the configurations where it does not."""
    from dip_r1.models import release_checkpoint_memory

    release_checkpoint_memory(model)


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Highest resident set size of this process since it started or since :func:`reset_peak_rss`, MiB."""
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Restart the peak-RSS counter at the current RSS (Linux ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


SHAPES = {"qwen2_5_vl_3b": ("qwen2_5_vl", "Qwen2.5-VL-3B-Instruct")}
"""Real architectures for random-init runs where the weights cannot be downloaded (the figures depend on the
shapes, not on the values): the published sizes of ``dip_r1.architectures``."""


def shape_config(shape: str, tokenizer):
    """A transformers config of a named real model's architecture, with the tiny tokenizer's special ids."""
    from transformers import Qwen2_5_VLConfig

    from dip_r1.architectures import published_config
    from dip_r1.tiny import SPECIAL_TOKENS

    _, name = SHAPES[shape]
    text = published_config(name)
    vision = text.pop("vision_config")
    text.pop("model_type")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        text,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_shape(shape: str, out: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Write a randomly initialised checkpoint of ``shape`` (weights in ``dtype``) with the tiny tokenizer and
    the full-size Qwen processor limits; reuse ``out`` if it already holds one."""
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from dip_r1.data.prompts import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS
    from dip_r1.tiny import CHAT_TEMPLATE, build_tokenizer

    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix=f"{shape}-"))
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(2048)
    config = shape_config(shape, tokenizer)
    torch.manual_seed(0)
    with torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    ):  # random init of 3.75 B: faster on a GPU
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS).save_pretrained(out)
    (out / "processor_config.json").write_text('{"processor_class": "Qwen2_5_VLProcessor"}')
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


def crowd_batch(module, prompts: int, width: int, height: int, max_pixels: int | None, seed: int = 0) -> dict:
    """A collated batch of ``prompts`` synthetic crowd images at ``width`` x ``height`` (the quickstart's data),
    with the tiny bases' system prompt and the targets, and the sources when ``module`` zooms."""

    from dip_r1.data import DetectionDataModule
    from dip_r1.data.prompts import DetectionPromptBuilder
    from dip_r1.data.sources import SyntheticCrowd
    from dip_r1.pretrain import TINY_SYSTEM_PROMPT

    root = Path(tempfile.mkdtemp()) / "crowd"
    source = SyntheticCrowd(
        str(root), n=prompts, seed=seed + 11, width=width, height=height, min_people=1, max_people=3
    )
    builder = DetectionPromptBuilder(system_prompt=TINY_SYSTEM_PROMPT, max_pixels=max_pixels)
    data = DetectionDataModule(val=[source], prompt_builder=builder, batch_size=prompts, num_workers=0)
    data.connect(module.processor, **module.data_spec())
    return data.on_before_batch_transfer(next(iter(data.val_dataloader())), 0)
