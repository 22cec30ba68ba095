"""The rollout's vision output reused by scoring: same log-probs, no second encoder run, and only when exact."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from helpers import prompt_batch, sample

from dip_r1 import reuse
from dip_r1.models import LoraSpec, load_policy
from dip_r1.reuse import encode_images
from dip_r1.scoring import all_logprobs


def _count_vision_calls(model) -> list[int]:
    """Images through the vision tower, one entry per forward call."""
    calls: list[int] = []
    visual = next(m for n, m in model.named_modules() if n.endswith("visual"))
    visual.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(len(kwargs["grid_thw"])), with_kwargs=True
    )
    return calls


def test_cached_image_features_score_like_the_images(tiny_model):
    model, processor = load_policy(tiny_model, lora=LoraSpec(r=4, dropout=0.0))
    inputs = prompt_batch(processor)
    calls = _count_vision_calls(model)
    torch.manual_seed(0)
    rollout = sample(model, inputs, group_size=3, max_new_tokens=5, eos=[3])
    assert rollout.image_features is not None
    assert calls == [2]  # one batched call that encodes the 2 prompts' images, not 2 x 3
    cached = all_logprobs(model, inputs, rollout, micro_batch_size=4)
    assert calls == [2]  # scoring 6 completions ran no encoder at all
    fresh = all_logprobs(model, inputs, dataclasses.replace(rollout, image_features=None), micro_batch_size=4)
    # without the cache each micro-batch encodes its images: the first (rows of prompts 0, 0, 0, 1) once
    # per completion, the second (one prompt's last 2 rows, prefix-shared) once for its one prompt
    assert calls == [2, 4, 1]
    torch.testing.assert_close(cached, fresh)


def test_no_cache_when_the_vision_tower_trains(tiny_qwen2_vl, monkeypatch):
    monkeypatch.setattr(reuse, "_FALLBACKS", set())  # warned once per process: forget earlier tests' warnings
    model, processor = load_policy(tiny_qwen2_vl, freeze_vision=False)
    inputs = prompt_batch(processor)
    with pytest.warns(UserWarning, match="the vision tower trains"):  # said once, with why
        assert encode_images(model, inputs) is None  # its output would need gradients in the scoring pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encode_images(model, inputs) is None  # not warned twice
    model.requires_grad_(False)
    assert encode_images(model, inputs) is not None
