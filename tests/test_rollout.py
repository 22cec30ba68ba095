"""Rollouts: the custom sampler equals HF generate, runs the vision encoder once per prompt, and masks right."""

from __future__ import annotations

import torch
from helpers import prompt_batch, sample

from dip_r1.models import load_policy
from dip_r1.scoring import all_logprobs, micro_batches, select_prompts


def _greedy(model, inputs, group_size=1, **kw):
    return sample(model, inputs, group_size=group_size, max_new_tokens=12, do_sample=False, **kw)


def test_greedy_sampler_matches_generate(tiny_model):
    model, processor = load_policy(tiny_model)
    model.eval()
    inputs = prompt_batch(processor)
    ours = _greedy(model, inputs).completion_ids
    ref = model.generate(**inputs, do_sample=False, max_new_tokens=12, eos_token_id=10**6, pad_token_id=0)
    assert torch.equal(ours, ref[:, inputs["input_ids"].shape[1] :])
    # the prompt's cache repeated for a group (keys and values; Qwen3.5's conv and recurrent states too):
    # every greedy row of a prompt's group is that prompt's greedy completion
    group = _greedy(model, inputs, group_size=3).completion_ids
    assert torch.equal(group, ours.repeat_interleave(3, dim=0))


def test_sampler_logprobs_positions_agree_with_full_forward(tiny_qwen2_vl):
    # Scoring a greedy completion with the full forward must find each greedy token the most likely one:
    # this only holds when the sampler's rotary positions equal the full forward's.
    model, processor = load_policy(tiny_qwen2_vl)
    model.eval()
    inputs = prompt_batch(processor)
    rollout = _greedy(model, inputs)
    logp = all_logprobs(model, inputs, rollout, micro_batch_size=1)
    assert logp.shape == rollout.completion_ids.shape
    from dip_r1.scoring import completion_logprobs

    index = rollout.prompt_index
    prompt = select_prompts(inputs, index)
    ids = torch.cat([prompt["input_ids"], rollout.completion_ids], 1)
    logits = model(
        input_ids=ids,
        attention_mask=torch.cat([prompt["attention_mask"], rollout.mask.long()], 1),
        mm_token_type_ids=torch.cat(
            [prompt["mm_token_type_ids"], torch.zeros_like(rollout.completion_ids)], 1
        ),
        pixel_values=prompt["pixel_values"],
        image_grid_thw=prompt["image_grid_thw"],
    ).logits[:, inputs["input_ids"].shape[1] - 1 : -1]
    assert torch.equal(logits.argmax(-1), rollout.completion_ids)
    again = completion_logprobs(model, inputs, index, rollout.completion_ids, rollout.mask)
    torch.testing.assert_close(again, logp)


def test_vision_encoder_runs_once_per_prompt(tiny_qwen2_vl):
    model, processor = load_policy(tiny_qwen2_vl)
    inputs = prompt_batch(processor)
    calls = []
    visual = next(m for n, m in model.named_modules() if n.endswith("visual"))
    visual.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    rollout = sample(model, inputs, group_size=4, max_new_tokens=6, eos=[3], temperature=1.0)
    assert len(calls) == 1  # one batched call for the 2 prompts, not one per completion
    assert rollout.completion_ids.shape[0] == 8
    assert rollout.prompt_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_suppressed_tokens_never_sampled_and_masks(tiny_qwen2_vl):
    model, processor = load_policy(tiny_qwen2_vl)
    inputs = prompt_batch(processor)
    vocab = model.config.text_config.vocab_size
    banned = list(range(0, vocab, 2))  # half the vocabulary
    torch.manual_seed(0)
    r = sample(model, inputs, group_size=8, max_new_tokens=20, eos=[1], suppress=banned)
    sampled = r.completion_ids[r.mask]
    assert (sampled % 2 == 1).all()
    # rows without EOS are truncated and fully masked; rows with EOS stop there
    for row, m, trunc in zip(r.completion_ids, r.mask, r.truncated):
        hits = (row == 1).nonzero()
        if trunc:
            assert len(hits) == 0 and m.all()
        else:
            assert m.sum() == hits[0, 0] + 1


def test_min_new_tokens_and_micro_batches():
    assert micro_batches(4, 4) == [slice(0, 4)]
    assert micro_batches(0, 3) == []
