"""What a rollout computes once and reuses across passes, per model family: the vision encoder's output (with
Qwen3-VL's deepstack features) and the prompt's cache repeated for its group (with Qwen3.5's linear-attention
states). Where a family's outputs are not understood, the shortcut is off and the reason is warned once.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn


def _vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision encoder (the module named ``visual``, as in every Qwen-VL family), if any."""
    return next((m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "visual"), None)


def encode_images(model: nn.Module, inputs: Mapping[str, Tensor]):
    """The vision encoder's output for the batch's images (one per prompt), or None when it cannot be reused.

    It is reused by the prefill and by every scoring pass (policy, old and reference log-probs), so the
    encoder runs once per prompt per step instead of once per completion per pass. That is exact only when
    the encoder is the same in all of them: no trainable weight and no adapter in the vision tower (frozen
    vision, the default), and a model whose forward takes ``mm_encoder_outputs``. Qwen3-VL's deepstack
    features (one per-image tensor per language layer they enter) are carried and selected per prompt too.
    Otherwise the reason is warned once and the images go through the encoder in every pass.
    """
    if "pixel_values" not in inputs:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    visual = _vision_tower(base)
    if "image_grid_thw" not in inputs or visual is None:
        return fallback_once(
            "vision features not reused: no Qwen-style vision tower (`visual`, `image_grid_thw`)"
        )
    if "mm_encoder_outputs" not in inspect.signature(base.forward).parameters or not hasattr(
        base, "get_image_features"
    ):
        return fallback_once("vision features not reused: the model's forward takes no `mm_encoder_outputs`")
    if any(p.requires_grad for p in visual.parameters()) or any(
        "lora_" in n for n, _ in visual.named_modules()
    ):
        return fallback_once(
            "vision features not reused: the vision tower trains (its output needs gradients)"
        )
    with torch.no_grad():
        out = base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    n = len(inputs["image_grid_thw"])
    if not _per_image(out.pooler_output, n) or any(
        not (_per_image(v, n) or _per_layer(v, n)) for v in _extra_features(out).values()
    ):
        return fallback_once(f"vision features not reused: unknown encoder outputs {sorted(out.keys())}")
    return out


_FALLBACKS: set[str] = set()


def fallback_once(reason: str) -> None:
    """Warn, once per process and reason, that a rollout shortcut falls back to the plain path; returns None.

    The one place every shortcut reports its fallback (vision reuse here, the preallocated cache and merged LoRA in
    :mod:`dip_r1.decoding`): a fallback taken at every rollout would otherwise flood the output."""
    if reason not in _FALLBACKS:
        _FALLBACKS.add(reason)
        warnings.warn(f"{reason} (falling back to the exact, slower path)", stacklevel=3)


def _per_image(value, n: int) -> bool:
    """Whether ``value`` is one tensor per image (the merged features ``get_image_features`` splits by image)."""
    return isinstance(value, (tuple, list)) and len(value) == n and all(isinstance(v, Tensor) for v in value)


def _per_layer(value, n: int) -> bool:
    """Whether ``value`` is a list, one entry per language layer, of per-image tensors (Qwen3-VL's deepstack
    features, added into the first language layers' hidden states at the image positions)."""
    return isinstance(value, (tuple, list)) and all(_per_image(v, n) for v in value)


def _extra_features(out) -> dict:
    """The encoder outputs the language model reads besides ``pooler_output``: ``last_hidden_state`` (the
    unmerged patches, which no forward reads) left out."""
    return {k: v for k, v in out.items() if v is not None and k not in ("last_hidden_state", "pooler_output")}


def select_image_features(features, index: Tensor):
    """``mm_encoder_outputs`` for the prompts in ``index`` (repeated as needed), from :func:`encode_images`:
    the merged features and every per-layer feature (deepstack) of those prompts' images."""
    rows = index.tolist()
    pick = lambda per_image: tuple(per_image[i] for i in rows)  # noqa: E731
    extra = {
        k: pick(v) if isinstance(v[0], Tensor) else [pick(layer) for layer in v]
        for k, v in _extra_features(features).items()
    }
    return {"image": type(features)(pooler_output=pick(features.pooler_output), **extra)}


def repeat_cache(cache, repeats: int) -> None:
    """Repeat every row of a prompt cache ``repeats`` times (row ``i`` -> rows ``i * repeats ...``), out of place,
    so a repeat inside a gradient pass is differentiable.

    ``Cache.batch_repeat_interleave`` repeats keys and values only: a linear-attention layer's conv and recurrent
    states (Qwen3.5's Gated DeltaNet, transformers' ``LinearAttentionLayer``) have no such method, so they are
    repeated here too.
    """
    for layer in cache.layers:
        if hasattr(layer, "batch_repeat_interleave"):
            layer.batch_repeat_interleave(repeats)
        if not hasattr(layer, "recurrent_states"):
            continue
        for states in (layer.conv_states, layer.recurrent_states):
            for i, state in states.items():
                if state is not None:
                    states[i] = state.repeat_interleave(repeats, dim=0)
        # The layer copies each new recurrent state into the old one in place, but the old one is the input the
        # backward of the step that read it needs: store the new state instead (this cache lives one pass).
        layer.update_recurrent_state = partial(_store_recurrent_state, layer)


def _store_recurrent_state(layer, recurrent_states: Tensor, state_idx: int = 0, **kwargs) -> Tensor:
    layer.recurrent_states[state_idx] = recurrent_states
    return recurrent_states


@dataclass
class VisionInputs:
    """Every image of a rollout, prompts' and crops', in one bank: their patches, grids and, where the encoder's
    output can be reused (:func:`encode_images`), that output; any forward takes an ordered subset.

    Image ``i``'s patches are rows ``offsets[i]:offsets[i + 1]`` of ``pixel_values``. A sequence holding several
    images (a prompt image, then the crops a completion was shown) takes them in that order: the model scatters
    image features into its image tokens row by row, in order.
    """

    pixel_values: Tensor
    """``Tensor[patches, D]``: all images' patches, one image after the other."""
    grid_thw: Tensor
    """``Tensor[I, 3]``: each image's patch grid."""
    features: Any = None
    """The encoder's output for all ``I`` images (``pooler_output`` one tensor per image), or None."""

    @classmethod
    def encode(cls, model: nn.Module, pixel_values: Tensor, grid_thw: Tensor) -> VisionInputs:
        """The bank of these images, encoded once when the output can be reused."""
        features = encode_images(model, {"pixel_values": pixel_values, "image_grid_thw": grid_thw})
        return cls(pixel_values, grid_thw, features)

    def __len__(self) -> int:
        return len(self.grid_thw)

    def select(self, index: list[int]) -> dict[str, Any]:
        """The forward keywords for images ``index`` in that order: ``mm_encoder_outputs`` when encoded, else
        ``pixel_values`` and ``image_grid_thw`` (the encoder then runs in that forward); ``{}`` for none."""
        if not index:
            return {}
        if self.features is not None:
            return {"mm_encoder_outputs": select_image_features(self.features, torch.tensor(index))}
        sizes = self.grid_thw.prod(dim=-1).tolist()
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in index]).to(self.pixel_values.device)
        return {"pixel_values": self.pixel_values[rows], "image_grid_thw": self.grid_thw[index]}

    def extend(self, other: VisionInputs) -> VisionInputs:
        """This bank followed by ``other``'s images (their indices shift by ``len(self)``)."""
        features = None
        if self.features is not None and other.features is not None:
            features = _concat_features(self.features, other.features)
        return VisionInputs(
            torch.cat([self.pixel_values, other.pixel_values.to(self.pixel_values)]),
            torch.cat([self.grid_thw, other.grid_thw.to(self.grid_thw)]),
            features,
        )


def _concat_features(a, b):
    """Two encoder outputs as one: per-image tuples joined, per-layer lists joined layer by layer."""
    join = lambda x, y: tuple(x) + tuple(y)  # noqa: E731
    extra = {
        k: join(v, _extra_features(b)[k])
        if isinstance(v[0], Tensor)
        else [join(la, lb) for la, lb in zip(v, _extra_features(b)[k])]
        for k, v in _extra_features(a).items()
    }
    return type(a)(pooler_output=join(a.pooler_output, b.pooler_output), **extra)
