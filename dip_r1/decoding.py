"""What the decoding loop of a rollout needs, and nothing more: a preallocated KV cache, LoRA merged for the rollout.

The dynamic cache of HF grows every layer's keys and values by ``torch.cat`` at each token (a copy of the
whole cache per token and layer); :func:`preallocated_cache` copies the prompt's prefill into buffers sized for
the whole rollout once, and each token writes its column in place. The cache's views have the dynamic cache's
shapes (keys up to the current length), so attention, masks and results are the dynamic cache's, bit for bit.

peft runs every adapted linear layer as the base layer plus two small matmuls, per token; :func:`merged_lora`
swaps each adapted layer for its base layer holding a merged copy of the weight for the rollout, and puts the
original weight tensors back after: the weights after a rollout are the very tensors of before (peft's own
``merge`` / ``unmerge`` add and subtract the delta in place, which is not exact in floating point).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from dip_r1.reuse import fallback_once


class PreallocatedLayer(DynamicLayer):
    """A dynamic cache layer whose keys and values live in buffers of ``max_len`` positions, written in place.

    ``keys`` / ``values`` are views ``[N, H, length, D]`` of the buffers, so everything that reads a
    :class:`DynamicLayer` (mask sizes, sequence length) reads this one alike.
    """

    def __init__(self, keys: Tensor, values: Tensor, max_len: int, repeats: int) -> None:
        super().__init__()
        b, h, p, _ = keys.shape  # [B, H, P, D]: the prompts' prefill
        n = b * repeats
        self.device = keys.device
        self._k = keys.new_empty(n, h, max_len, keys.shape[-1])  # [N, H, L, D]
        self._v = values.new_empty(n, h, max_len, values.shape[-1])
        # row j of the group of prompt i is row i * repeats + j: broadcast the prompt, no repeated copy
        self._k.view(b, repeats, h, max_len, -1)[:, :, :, :p].copy_(keys[:, None])
        self._v.view(b, repeats, h, max_len, -1)[:, :, :, :p].copy_(values[:, None])
        self.length = p
        self.keys, self.values = self._k[:, :, :p], self._v[:, :, :p]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[-2]
        self._k[:, :, self.length : end].copy_(key_states)  # [N, H, q, D] into its columns
        self._v[:, :, self.length : end].copy_(value_states)
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_max_length(self) -> int:
        return self._k.shape[-2]


def preallocated_cache(prefill: Cache, repeats: int, max_len: int) -> tuple[Cache | None, str | None]:
    """The prompts' prefill cache repeated ``repeats`` times per prompt into preallocated layers of ``max_len``
    positions, or ``(None, reason)`` for a cache this cannot hold (sliding windows, linear-attention or recurrent
    states, offloading, quantised caches): the caller then keeps the dynamic cache."""
    if type(prefill) is not DynamicCache:
        return None, f"{type(prefill).__name__} is not a plain DynamicCache"
    kinds = {type(layer) for layer in prefill.layers}
    if kinds != {DynamicLayer}:
        return None, "cache layers " + ", ".join(
            sorted(k.__name__ for k in kinds)
        ) + " are not all DynamicLayer"
    if getattr(prefill, "offloading", False):
        return None, "the cache offloads layers to the CPU"
    if not all(layer.is_initialized and layer.keys.dim() == 4 for layer in prefill.layers):
        return None, "a cache layer holds no [batch, heads, length, dim] keys (shared or skipped layers)"
    cache = DynamicCache()
    cache.layers = [PreallocatedLayer(layer.keys, layer.values, max_len, repeats) for layer in prefill.layers]
    return cache, None


def _lora_layers(model: nn.Module):
    """``(parent, name, layer)`` for every peft LoRA linear layer outside the vision tower."""
    for parent_name, parent in model.named_modules():
        if "visual" in parent_name.split("."):
            continue  # the vision encoder runs once per prompt: nothing to gain, and its adapters must stay seen
        for name, child in parent.named_children():
            if name != "visual" and hasattr(child, "lora_A") and hasattr(child, "get_delta_weight"):
                yield parent, name, child


def _merge_blocker(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be merged exactly (None when it can)."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if type(base) is not nn.Linear or weight is None:
        return (
            f"base layer {type(base).__name__} is not a plain nn.Linear (4-bit or 8-bit bases stay unmerged)"
        )
    if type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point:
        return "the base weight is sharded or quantised"
    if layer.merged:
        return "adapters already merged (peft merge_adapter)"
    if getattr(layer, "lora_variant", None):
        return "a LoRA variant (DoRA, ...) is active"
    return None


@contextlib.contextmanager
def merged_lora(model: nn.Module, tokens: int):
    """LoRA adapters merged into copies of the base weights while the block runs, when that is exact and cheaper.

    Each adapted ``nn.Linear`` (outside the vision tower) is replaced in its parent by its base layer, whose
    ``weight`` is swapped for ``W + delta`` (a new tensor); on exit the peft layer and the original weight
    Parameter come back, so the weights are bit-identical to before. A layer is merged when that costs less than
    running its adapter on ``tokens`` rows: the merge is ``r * in * out`` multiply-adds, the adapter ``tokens *
    r * (in + out)``. The merged copies take the adapted layers' size in memory during the rollout. Outputs
    equal the adapters' up to float rounding (``W x + B A x`` against ``(W + B A) x``): the rollout samples
    from the same policy, and the loss recomputes every log-prob through the adapters. Layers whose adapters
    are disabled (the reference pass) are left alone.
    """
    swaps = []  # (parent, name, peft layer, base layer, original weight)
    try:
        for parent, name, layer in list(_lora_layers(model)):
            if layer.disable_adapters:
                continue  # the base model (a reference or compare_base pass): nothing to merge
            reason = _merge_blocker(layer)
            if reason is not None:
                fallback_once(f"LoRA stays unmerged for rollouts: {reason}")
                continue
            base = layer.get_base_layer()
            out_f, in_f = base.weight.shape
            if tokens * (in_f + out_f) < in_f * out_f:
                continue  # too few tokens to pay for the merge
            adapters = [a for a in layer.active_adapters if a in layer.lora_A]
            with torch.no_grad():
                merged = base.weight.detach().clone()
                for a in adapters:
                    merged += layer.get_delta_weight(a).to(merged.dtype)
            swaps.append((parent, name, layer, base, base.weight))
            base._parameters["weight"] = nn.Parameter(merged, requires_grad=False)
            setattr(parent, name, base)
        yield len(swaps)
    finally:
        for parent, name, layer, base, weight in reversed(swaps):
            base._parameters["weight"] = weight
            setattr(parent, name, layer)
