"""The zoom look: crops shown after ``</look>`` are scored exactly as sampled, in every family, shared or not,
with LoRA and QLoRA; a greedy zoom rollout is HF ``generate`` run in two parts; each crop is encoded once."""

from __future__ import annotations

import pytest
import torch
from zoom_tools import zoom_rollout

from dip_r1.models import LoraSpec, PolicySpec, load_policy
from dip_r1.scoring import all_logprobs, completion_logprobs
from dip_r1.tokens import TokenIds


def _coordinates(path: str) -> str:
    return PolicySpec(path).data_spec(None)["coordinates"]


@pytest.mark.parametrize("adapters", ["lora", "qlora", "full, vision trains"])
def test_scoring_equals_the_rollout_in_every_family(tiny_model, adapters, monkeypatch):
    torch.manual_seed(0)
    if adapters == "full, vision trains":  # the encoder's output cannot be reused: images go in every pass
        model, processor = load_policy(tiny_model, freeze_vision=False)
    else:
        quantization = "4bit" if adapters == "qlora" else None
        model, processor = load_policy(tiny_model, lora=LoraSpec(r=4, dropout=0.0), quantization=quantization)
    model.eval()
    rollout, inputs, _ = zoom_rollout(model, processor, _coordinates(tiny_model), monkeypatch, do_sample=True)
    crops = rollout.crops_per_completion.tolist()
    assert crops[2] == 0 and max(crops) >= 1  # the empty look opens nothing; the others open their regions
    tokens = TokenIds.of(model, processor)
    inserted = rollout.attention & ~rollout.mask
    # crop tokens are attended, never sampled: outside the loss, the length and max_new_tokens
    assert bool((rollout.completion_ids[inserted] == tokens.image[1]).any())
    assert rollout.lengths.max() <= 80
    for share in (True, False):
        for micro in (3, 2, 1):
            scored = all_logprobs(model, inputs, rollout, micro_batch_size=micro, share_prefix=share)
            gap = ((scored - rollout.logprobs).abs() * rollout.mask).max().item()
            assert gap <= 1e-4, (share, micro, gap)


def test_shared_prefix_equals_per_row_in_logprobs_and_gradients(tiny_qwen3_vl_zoom, monkeypatch):
    path = tiny_qwen3_vl_zoom
    torch.manual_seed(0)
    model, processor = load_policy(path, lora=LoraSpec(r=4, dropout=0.0))
    model.eval()
    rollout, inputs, _ = zoom_rollout(model, processor, _coordinates(path), monkeypatch)
    model.train()
    rows = slice(0, 3)  # one whole group: the shared path runs its prompt once
    weights = torch.randn(rollout.mask[rows].shape) * rollout.mask[rows]
    grads, values = [], []
    for share in (True, False):
        model.zero_grad(set_to_none=True)
        logp = completion_logprobs(
            model,
            inputs,
            rollout.prompt_index[rows],
            rollout.completion_ids[rows],
            rollout.mask[rows],
            share_prefix=share,
            zoom=rollout.zoom_columns(rows),
        )
        (logp * weights).sum().backward()
        values.append(logp.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=0)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def test_greedy_zoom_rollout_is_generate_in_two_parts(tiny_model, monkeypatch):
    model, processor = load_policy(tiny_model)
    model.eval()
    rollout, inputs, zoom = zoom_rollout(
        model,
        processor,
        _coordinates(tiny_model),
        monkeypatch,
        group_size=1,
        max_new_tokens=80,
        do_sample=False,
    )
    tokens = TokenIds.of(model, processor)
    for row in (0,):  # prompt 0 looked at two regions
        attended = rollout.attention[row]
        ids = rollout.completion_ids[row][attended]
        crops = rollout.crops[row]
        assert len(crops) >= 1
        end = int((ids == tokens.image[2]).nonzero().max()) + 1  # after the last crop's vision end
        keep = inputs["attention_mask"][row].bool()
        prompt_ids = inputs["input_ids"][row][keep]
        values, grid = zoom.pixels(row, crops)
        sizes = inputs["image_grid_thw"].prod(-1)
        prompt_pixels = inputs["pixel_values"][: sizes[0]] if row == 0 else inputs["pixel_values"][sizes[0] :]
        sequence = torch.cat([prompt_ids, ids[:end]])[None]
        image_pad = tokens.image[1]
        part_two = {
            "input_ids": sequence,
            "attention_mask": torch.ones_like(sequence),
            "pixel_values": torch.cat([prompt_pixels, values]),
            "image_grid_thw": torch.cat([inputs["image_grid_thw"][row : row + 1], grid]),
            "mm_token_type_ids": (sequence == image_pad).long(),
        }
        rest = int(rollout.mask[row].sum()) - int(rollout.mask[row][attended][:end].sum())
        ref = model.generate(
            **part_two,
            do_sample=False,
            max_new_tokens=rest,
            eos_token_id=list(tokens.eos),
            suppress_tokens=list(tokens.never_sampled),  # as the rollout: never an image token
            pad_token_id=tokens.pad,
        )
        assert torch.equal(ref[0, sequence.shape[1] :], ids[end : end + rest])


def test_each_crop_is_encoded_once_per_step(tiny_qwen2_vl, monkeypatch):
    model, processor = load_policy(tiny_qwen2_vl)  # vision frozen: its output is reused
    model.eval()
    images = []
    visual = next(m for n, m in model.named_modules() if n.endswith("visual"))
    visual.register_forward_hook(
        lambda m, args, kwargs, out: images.append(
            len(kwargs["grid_thw"] if "grid_thw" in kwargs else args[1])
        ),
        with_kwargs=True,
    )
    rollout, inputs, _ = zoom_rollout(model, processor, _coordinates(tiny_qwen2_vl), monkeypatch)
    crops = int(rollout.crops_per_completion.sum())
    assert sum(images) == len(inputs["image_grid_thw"]) + crops  # prompts + crops, each once
    all_logprobs(model, inputs, rollout, micro_batch_size=2)
    assert sum(images) == len(inputs["image_grid_thw"]) + crops  # scoring encoded nothing again


@pytest.fixture(scope="session")
def tiny_qwen3_vl_zoom(tiny_checkpoint) -> str:
    return tiny_checkpoint("qwen3_vl")
