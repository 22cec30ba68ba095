"""Prefix-shared scoring: each prompt runs once per micro-batch, with the same log-probs and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import prompt_batch

import dip_r1.scoring as rollout_mod
from dip_r1.models import LoraSpec, load_policy
from dip_r1.reuse import encode_images
from dip_r1.rollout import Rollout
from dip_r1.scoring import all_logprobs, completion_logprobs

G = 3
# Rows 0-2 answer prompt 0, rows 3-5 prompt 1 (the longer one: left padding on prompt 0). Lengths 6, 3, 1,
# 5, 2, 6: every row but two ends in EOS (id 3) followed by padding (id 0).
LENGTHS = [6, 3, 1, 5, 2, 6]
T = 6


def _completions() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 60, (len(LENGTHS), T), generator=gen)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    for row, n in enumerate(LENGTHS):
        if n < T:
            ids[row, n - 1] = 3  # EOS, then padding
    ids = ids.masked_fill(~mask, 0)
    index = torch.arange(2).repeat_interleave(G)
    return index, ids, mask


def _spy(monkeypatch) -> list[int]:
    """Rows scored by the shared path, one entry per call."""
    calls: list[int] = []
    real = rollout_mod.shared_prefix_logprobs

    def spy(model, inputs, prompt_index, *args, **kwargs):
        calls.append(len(prompt_index))
        return real(model, inputs, prompt_index, *args, **kwargs)

    monkeypatch.setattr(rollout_mod, "shared_prefix_logprobs", spy)
    return calls


def _score(model, inputs, index, ids, mask, features, share):
    """Log-probs and the gradient of every trainable parameter of a weighted sum of them."""
    model.zero_grad(set_to_none=True)
    logp = completion_logprobs(model, inputs, index, ids, mask, image_features=features, share_prefix=share)
    weights = torch.linspace(-1.0, 2.0, ids.numel()).view_as(logp)  # rows of one group weigh differently
    (logp * weights * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logp.detach(), grads


@pytest.mark.parametrize("lora", [LoraSpec(r=4, dropout=0.0), None], ids=["lora", "full"])
def test_shared_prefix_equals_per_row_scoring(tiny_model, lora, monkeypatch):
    calls = _spy(monkeypatch)
    index, ids, mask = _completions()
    model, processor = load_policy(tiny_model, lora=lora)
    model.train()
    inputs = prompt_batch(processor)
    assert inputs["attention_mask"][0, 0] == 0  # prompt 0 is left-padded
    features = encode_images(model, inputs)
    assert features is not None
    ref, ref_grads = _score(model, inputs, index, ids, mask, features, share=False)
    assert calls == []
    ours, grads = _score(model, inputs, index, ids, mask, features, share=True)
    assert calls == [6]  # both groups at once, each prompt run once
    torch.testing.assert_close(ours[mask], ref[mask], atol=1e-5, rtol=0)
    assert len(grads) == len(ref_grads) > 0
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # Without cached image features the prompt pass encodes the images itself: same log-probs.
    with torch.no_grad():
        again = completion_logprobs(model, inputs, index, ids, mask)
    assert calls == [6, 6]
    calls.clear()
    torch.testing.assert_close(again[mask], ref[mask], atol=1e-5, rtol=0)


def test_all_logprobs_shares_whole_groups_only(tiny_qwen2_vl, monkeypatch):
    calls = _spy(monkeypatch)
    index, ids, mask = _completions()
    model, processor = load_policy(tiny_qwen2_vl, lora=LoraSpec(r=4, dropout=0.0))
    model.eval()
    inputs = prompt_batch(processor)
    rollout = Rollout(index, ids, mask, torch.zeros(6, dtype=torch.bool), encode_images(model, inputs))
    ref = all_logprobs(model, inputs, rollout, micro_batch_size=6, share_prefix=False)
    assert calls == []
    # micro-batches of 4 and 2 rows: [0, 0, 0, 1] mixes unequal groups (per-row path), [1, 1] is shared
    mixed = all_logprobs(model, inputs, rollout, micro_batch_size=4)
    assert calls == [2]
    torch.testing.assert_close(mixed[mask], ref[mask], atol=1e-5, rtol=0)
    shared = all_logprobs(model, inputs, rollout, micro_batch_size=3)  # one group per micro-batch
    assert calls == [2, 3, 3]
    torch.testing.assert_close(shared[mask], ref[mask], atol=1e-5, rtol=0)


def test_gradient_checkpointing_falls_back(tiny_qwen2_5_vl, monkeypatch):
    # HF drops the KV cache inside a checkpointed layer in training mode: the per-row path must run instead.
    calls = _spy(monkeypatch)
    index, ids, mask = _completions()
    model, processor = load_policy(
        tiny_qwen2_5_vl, lora=LoraSpec(r=4, dropout=0.0), gradient_checkpointing=True
    )
    inputs = prompt_batch(processor)
    features = encode_images(model, inputs)
    model.train()
    ours, grads = _score(model, inputs, index, ids, mask, features, share=True)
    assert calls == []
    model.eval()  # no recomputation in eval mode: the cache is kept and shared
    with torch.no_grad():
        shared = completion_logprobs(model, inputs, index, ids, mask, image_features=features)
    assert calls == [6]
    torch.testing.assert_close(shared[mask], ours[mask], atol=1e-5, rtol=0)
    assert all(torch.isfinite(g).all() for g in grads.values()) and len(grads) > 0
