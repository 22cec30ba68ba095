"""Tiny, randomly initialised Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 checkpoints for tests, benchmarks and the quickstart.

Nothing is downloaded: the configs are written here, the tokenizer is a byte-level BPE trained in a second on
texts of the Think-Look-Answer format, and the processor is Qwen's own with small pixel limits.

    python -m dip_r1.tiny --out runs/tiny-qwen2_vl --family qwen2_vl --size xs
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen's chat template, reduced to what a single-image conversation needs.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# (text hidden, text layers, heads, kv heads, text mlp, vision width, vision depth, vocab)
SIZES = {
    "xs": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=192, vision=32, vision_depth=1, vocab=1024),
    "t": dict(hidden=128, layers=4, heads=4, kv_heads=2, mlp=384, vision=96, vision_depth=2, vocab=1024),
    "s": dict(hidden=256, layers=5, heads=4, kv_heads=2, mlp=768, vision=64, vision_depth=2, vocab=2048),
    # ~100 M parameters, nearly all in the language model's linear layers: the memory benchmark's QLoRA subject
    "m": dict(hidden=768, layers=12, heads=12, kv_heads=4, mlp=3072, vision=128, vision_depth=2, vocab=2048),
}
# Pixel limits of the tiny processors: images of at most 8 x 8 merged patches (64 image tokens).
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 64
# family: (processor class, vision patch size)
FAMILY_NAMES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
PROCESSORS = {
    "qwen2_vl": ("Qwen2VLProcessor", 14),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", 14),
    "qwen3_vl": ("Qwen3VLProcessor", 16),
    "qwen3_5": ("Qwen3VLProcessor", 16),  # transformers' processing_auto maps qwen3_5 to Qwen3VLProcessor
}


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Texts in the shape of prompts and Think-Look-Answer answers, to train the BPE merges on."""
    rng = random.Random(seed)
    texts = [
        "You are a helpful assistant. Detect every person in the image. First think about the scene, "
        "then look at the ambiguous regions, then answer with the boxes of every person.",
        "<think>The scene shows a crowd of people; several are occluded by others.</think>",
    ]
    try:  # the data side's default prompts, when present, make the prompt tokens few
        from dip_r1.data import prompts

        texts += [v for k, v in vars(prompts).items() if k.isupper() and isinstance(v, str)]
    except ImportError:
        pass
    for _ in range(n):
        k = rng.randint(0, 6)
        boxes = [[rng.randint(0, 999) for _ in range(4)] for _ in range(k)]
        look = json.dumps(boxes[: rng.randint(0, 2)])
        answer = json.dumps(
            [{"bbox_2d": b, "label": rng.choice(["person", "pedestrian", "car"])} for b in boxes]
        )
        texts.append(
            f"<think>There are {k} people in the image, some occluded.</think>\n<look>{look}</look>\n"
            f"<answer>{answer}</answer>"
        )
    return texts


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer (digits split one by one, as Qwen's) with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _qwen3_vision(s: dict, **extra) -> dict:
    """The vision tower of Qwen3-VL and Qwen3.5 at a tiny size: patch 16, a 16 x 16 learned position table."""
    return dict(
        depth=s["vision_depth"],
        hidden_size=s["vision"],
        intermediate_size=2 * s["vision"],
        out_hidden_size=s["hidden"],
        num_heads=2,
        patch_size=16,
        num_position_embeddings=256,
        **extra,
    )


def build_config(family: str, size: str, tokenizer):
    """A transformers config of the family's architecture at a tiny size."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3_5Config, Qwen3VLConfig

    s = SIZES[size]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = s["hidden"] // s["heads"]
    # mrope splits half the head dimension into (temporal, height, width) sections
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=s["hidden"],
        intermediate_size=s["mlp"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    if family == "qwen2_vl":
        vision = dict(
            depth=s["vision_depth"], embed_dim=s["vision"], hidden_size=s["hidden"], num_heads=2, mlp_ratio=2
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    if family == "qwen2_5_vl":
        vision = dict(
            depth=s["vision_depth"],
            hidden_size=s["vision"],
            intermediate_size=2 * s["vision"],
            out_hidden_size=s["hidden"],
            num_heads=2,
            window_size=56,
            fullatt_block_indexes=[s["vision_depth"] - 1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    if family == "qwen3_vl":
        # Qwen3-VL-2B-Instruct's layout at a tiny size: patch 16, interleaved mrope, learned absolute position
        # embeddings in the vision tower and deepstack features from an early vision block.
        text.update(head_dim=head_dim, tie_word_embeddings=True)
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
        return Qwen3VLConfig(
            text_config=text, vision_config=_qwen3_vision(s, deepstack_visual_indexes=[0]), **common
        )
    if family == "qwen3_5":
        # transformers' models/qwen3_5/configuration_qwen3_5.py at a tiny size: Gated-DeltaNet linear-attention
        # layers and full-attention layers three to one (here one of each, so both caches are exercised),
        # rotary on a quarter of the head (partial_rotary_factor 0.25), interleaved mrope, no deepstack.
        heads = 2
        head_dim = s["hidden"] // heads
        quarter = head_dim // 8  # half of the rotary quarter of the head, split (t, h, w)
        text.update(
            num_attention_heads=heads,
            num_key_value_heads=1,
            head_dim=head_dim,
            layer_types=["linear_attention", "full_attention"] * (s["layers"] // 2)
            + ["linear_attention"] * (s["layers"] % 2),
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            partial_rotary_factor=0.25,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3],
                "mrope_interleaved": True,
            },
        )
        return Qwen3_5Config(text_config=text, vision_config=_qwen3_vision(s), **common)
    raise ValueError(f"unknown family {family!r}: expected one of {FAMILY_NAMES}")


def save_tiny(out: str | Path, family: str = "qwen2_vl", size: str = "xs", seed: int = 0) -> Path:
    """Write a randomly initialised checkpoint, its tokenizer and its processor to ``out``."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: expected one of {sorted(SIZES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(SIZES[size]["vocab"])
    config = build_config(family, size, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor_class, patch = PROCESSORS[family]
    unit = (2 * patch) ** 2  # pixels of one merged 2 x 2 patch
    Qwen2VLImageProcessorPil(
        patch_size=patch, min_pixels=unit * MIN_PIXELS // 28**2, max_pixels=unit * MAX_PIXELS // 28**2
    ).save_pretrained(out)
    # The processor's own files, written by hand: the processor class cannot be built without torchvision's
    # video processor here, and dip_r1.models.load_processor reassembles it from these parts.
    (out / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}, indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder to write the checkpoint to")
    parser.add_argument("--family", default="qwen2_vl", choices=FAMILY_NAMES)
    parser.add_argument(
        "--size",
        default="xs",
        choices=sorted(SIZES),
        help="xs: under 2 M parameters; t: ~1.6 M with a wider vision tower (the seeing base); s: ~5 M; m: ~100 M",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = parser.parse_args(argv)
    out = save_tiny(args.out, args.family, args.size, args.seed)
    from transformers import AutoModelForImageTextToText

    n = sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(out).parameters())
    print(json.dumps({"out": str(out), "family": args.family, "size": args.size, "parameters": n}))


if __name__ == "__main__":
    main()
