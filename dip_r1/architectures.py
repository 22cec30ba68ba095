"""The published Qwen vision-language checkpoints' sizes: the ``config.json`` keys that set every tensor's shape.

No weights, no download: the memory planner (:mod:`dip_r1.plan`) reads these when a recipe's ``policy.path`` holds
no ``config.json`` yet (a recipe written before its model is fetched), and ``bench/real_size.py`` builds random
models of these sizes on top of the published folder layouts of ``tests/fixtures/published``.

Sources (each value was read from the cited text; "index id" is a file of the public code index searched, which
names no repository):

- Qwen2.5-VL-3B-Instruct: its published ``config.json``, verbatim in ``zhanggaojian/Qwen2.5-VL-3B-LLMQ_Samples``
  (``models/Qwen2.5-VL-3B-Instruct/config.json``) and in index id 11644284334.
- Qwen2.5-VL-7B-Instruct: transformers' ``Qwen2_5_VLConfig`` defaults are the 7B's (hidden 3584, intermediate
  18944, 28 layers, 28 heads, 4 KV heads, vision out 3584); ``tie_word_embeddings`` false as published.
- Qwen3-VL-2B-Instruct: 28 layers, width 2048, 16 heads, 8 KV heads, head 128, vision 24 x 1024 x 16 heads, patch
  16 (a dump of the published model's metadata, index id 35048442739; the fixture README's id 58790212583 for
  ``deepstack_visual_indexes`` [5, 11, 17] and ``rope_theta`` 5e6); vision intermediate 4096 and out 2048 as
  in sgl-jax's ``Qwen3VLVisionConfig`` for the 2B; text intermediate 6144 (Qwen3-1.7B's, the 2B's language model).
- Qwen3-VL-4B / 8B-Instruct: transformers' ``Qwen3VLConfig`` vision defaults are the 8B's (27 x 1152, intermediate
  4304, deepstack [8, 16, 24]); the 4B's vision tower is the 2B's; text sizes as published (4B: 2560 / 9728 / 36
  layers / 32 heads / 8 KV; 8B: 4096 / 12288 / 36 / 32 / 8).
- Qwen3.5-2B: ``text_config`` verbatim from ``lawrence3699/Jev-Style-Qwen3.5-2B-Decision-MLX-bf16`` ``config.json``
  (24 layers, 3 linear-attention to 1 full, width 2048, head 256, 16 + 16 linear heads of 128); vision 24 x 1024
  as quoted for Qwen3.5-4B (index id 60353904873), intermediate 4096, 16 heads, no deepstack.
- Qwen3.5-4B: ``text_config`` as quoted in index ids 60353904873 and 51836052333 (2560 / 9216 / 32 layers / 16
  heads / 4 KV / head 256, linear heads 16 key + 32 value of 128), vision as the 2B's.
"""

from __future__ import annotations

import copy

_QWEN2_5_VL_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)
_QWEN3_VISION_SMALL = dict(
    depth=24,
    hidden_size=1024,
    intermediate_size=4096,
    num_heads=16,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=2304,
)


def _qwen3_5_layers(n: int) -> list[str]:
    """Qwen3.5's pattern: three Gated-DeltaNet (linear-attention) layers, then one full-attention layer."""
    return [("full_attention" if (i + 1) % 4 == 0 else "linear_attention") for i in range(n)]


PUBLISHED: dict[str, dict] = {
    "Qwen2.5-VL-3B-Instruct": dict(
        model_type="qwen2_5_vl",
        fixture="Qwen2.5-VL-3B-Instruct",
        tie_word_embeddings=True,
        text=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
            mrope_section=[16, 24, 24],
        ),
        vision=dict(_QWEN2_5_VL_VISION, out_hidden_size=2048),
    ),
    "Qwen2.5-VL-7B-Instruct": dict(
        model_type="qwen2_5_vl",
        fixture="Qwen2.5-VL-3B-Instruct",
        tie_word_embeddings=False,
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            mrope_section=[16, 24, 24],
        ),
        vision=dict(_QWEN2_5_VL_VISION, out_hidden_size=3584),
    ),
    "Qwen3-VL-2B-Instruct": dict(
        model_type="qwen3_vl",
        fixture="Qwen3-VL-2B-Instruct",
        tie_word_embeddings=True,
        text=dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            mrope_section=[24, 20, 20],
        ),
        vision=dict(_QWEN3_VISION_SMALL, out_hidden_size=2048, deepstack_visual_indexes=[5, 11, 17]),
    ),
    "Qwen3-VL-4B-Instruct": dict(
        model_type="qwen3_vl",
        fixture="Qwen3-VL-2B-Instruct",
        tie_word_embeddings=True,
        text=dict(
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            mrope_section=[24, 20, 20],
        ),
        vision=dict(_QWEN3_VISION_SMALL, out_hidden_size=2560, deepstack_visual_indexes=[5, 11, 17]),
    ),
    "Qwen3-VL-8B-Instruct": dict(
        model_type="qwen3_vl",
        fixture="Qwen3-VL-2B-Instruct",
        tie_word_embeddings=False,
        text=dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            mrope_section=[24, 20, 20],
        ),
        vision=dict(
            _QWEN3_VISION_SMALL,
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            out_hidden_size=4096,
            deepstack_visual_indexes=[8, 16, 24],
        ),
    ),
    "Qwen3.5-2B": dict(
        model_type="qwen3_5",
        fixture="Qwen3.5-2B",
        tie_word_embeddings=True,
        text=dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=24,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=256,
            vocab_size=248320,
            layer_types=_qwen3_5_layers(24),
            full_attention_interval=4,
            linear_num_key_heads=16,
            linear_num_value_heads=16,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            mrope_section=[11, 11, 10],
        ),
        vision=dict(_QWEN3_VISION_SMALL, out_hidden_size=2048, deepstack_visual_indexes=[]),
    ),
    "Qwen3.5-4B": dict(
        model_type="qwen3_5",
        fixture="Qwen3.5-2B",
        tie_word_embeddings=True,
        text=dict(
            hidden_size=2560,
            intermediate_size=9216,
            num_hidden_layers=32,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=256,
            vocab_size=248320,
            layer_types=_qwen3_5_layers(32),
            full_attention_interval=4,
            linear_num_key_heads=16,
            linear_num_value_heads=32,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            mrope_section=[11, 11, 10],
        ),
        vision=dict(_QWEN3_VISION_SMALL, out_hidden_size=2560, deepstack_visual_indexes=[]),
    ),
}

SIZES: dict[tuple[str, str], str] = {
    ("qwen2_5_vl", "3b"): "Qwen2.5-VL-3B-Instruct",
    ("qwen2_5_vl", "7b"): "Qwen2.5-VL-7B-Instruct",
    ("qwen3_vl", "2b"): "Qwen3-VL-2B-Instruct",
    ("qwen3_vl", "4b"): "Qwen3-VL-4B-Instruct",
    ("qwen3_vl", "8b"): "Qwen3-VL-8B-Instruct",
    ("qwen3_5", "2b"): "Qwen3.5-2B",
    ("qwen3_5", "4b"): "Qwen3.5-4B",
}
"""``(family, size)`` as ``bench/real_size.py`` names them, to the published checkpoint's name."""


def resize(config: dict, name: str) -> dict:
    """``config`` (a ``config.json`` dict of the family, e.g. a shrunk fixture's) with every size key of the
    published checkpoint ``name``; token ids, activations and everything else are kept."""
    sizes = PUBLISHED[name]
    out = copy.deepcopy(config)
    if out.get("model_type") != sizes["model_type"]:
        raise ValueError(
            f"{name} is a {sizes['model_type']} model, the config a {out.get('model_type')!r} one"
        )
    text = dict(sizes["text"])
    section = text.pop("mrope_section")
    nested = "text_config" in out
    target = out["text_config"] if nested else out
    target.update(text)
    rope = next(
        (target[k] for k in ("rope_parameters", "rope_scaling") if isinstance(target.get(k), dict)), None
    )
    if rope is None:
        rope = target.setdefault("rope_parameters", {"rope_type": "default"})
    rope["mrope_section"] = section
    if "rope_parameters" in out:  # Qwen2.5-VL written by transformers 5 keeps the rope at the top level
        out["rope_parameters"]["mrope_section"] = section
    out["tie_word_embeddings"] = sizes["tie_word_embeddings"]
    if nested:
        out["text_config"]["tie_word_embeddings"] = sizes["tie_word_embeddings"]
    out.setdefault("vision_config", {}).update(sizes["vision"])
    if sizes["model_type"] == "qwen2_5_vl":
        out["vision_config"]["out_hidden_size"] = sizes["text"]["hidden_size"]
    return out


def published_config(name: str) -> dict:
    """A ``config.json`` dict of the published checkpoint ``name``: its sizes and family, no token ids (what the
    memory planner needs when the checkpoint folder holds no ``config.json``)."""
    sizes = PUBLISHED[name]
    base = {"model_type": sizes["model_type"], "vision_config": {}}
    if sizes["model_type"] != "qwen2_5_vl":
        base["text_config"] = {}
    return resize(base, name)
