"""A reward credited to one block of the completion reaches only that block's tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from dip_r1.config import SamplingConfig
from dip_r1.credit import block_token_mask
from dip_r1.grpo import group_advantages
from dip_r1.rewards import LookReward, PrecisionRecallReward, RewardSuite, parse_completion

TEXTS = [
    "<think>2 persons</think>\n<look>[[0, 0, 5, 5]]</look>\n<answer>[[0, 0, 5, 5], [6, 6, 9, 9]]</answer>",
    "<think>1 person</think>\n<look>[]</look>\n<answer>[[0, 0, 5, 5]]</answer>",
    "no blocks at all",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2_vl):
    return AutoTokenizer.from_pretrained(tiny_qwen2_vl)


def _rows(tokenizer, texts, pad_to=None):
    """Completion ids padded with the pad id after an EOS, as a rollout writes them, and their mask."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = pad_to or max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    completion_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
    mask = torch.tensor([[k < len(row) for k in range(width)] for row in ids])
    return completion_ids, mask


def test_block_token_mask_covers_the_look_content(tokenizer):
    completion_ids, mask = _rows(tokenizer, TEXTS, pad_to=64)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    assert texts == TEXTS
    parsed = [parse_completion(t) for t in texts]
    look = block_token_mask(tokenizer, completion_ids, mask, parsed, "look")
    assert look.shape == completion_ids.shape and not (look & ~mask).any()
    for row, text in enumerate(TEXTS[:2]):
        spelled = tokenizer.decode(completion_ids[row][look[row]])
        content = text[slice(*parsed[row].block_spans["look"])]
        assert content in spelled and "answer" not in spelled and "think" not in spelled  # nothing beyond
        assert len(spelled) <= len(content) + len("<look></look>")
    assert not look[2].any()  # no look block: no look token
    answer = block_token_mask(tokenizer, completion_ids, mask, parsed, "answer")
    assert not (answer & look).any()


def test_credited_advantages_give_the_look_reward_to_the_look_tokens_only(tokenizer):
    # One prompt, G = 3: the first and second answers are right, the third is missing; only the first looks.
    texts = TEXTS
    completion_ids, mask = _rows(tokenizer, texts)
    parsed = [parse_completion(t) for t in texts]
    suite = RewardSuite(
        {"look": LookReward(grid=8, resolve=False), "accuracy": PrecisionRecallReward()},
        credit={"look": "look"},
    )
    targets = [{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "ignore": torch.zeros(0, 4), "image_size": (10, 10)}]
    scores = suite(parsed, targets, 3)
    assert scores["look"][0] > 0 and scores["look"][1:].tolist() == [0.0, 0.0]
    full = group_advantages(scores["total"], 3)
    look = block_token_mask(tokenizer, completion_ids, mask, parsed, "look")
    out = suite.advantages(
        scores, 3, block_mask=lambda block: block_token_mask(tokenizer, completion_ids, mask, parsed, block)
    )
    outside = group_advantages(scores["accuracy"], 3)
    assert out.shape == mask.shape
    assert torch.equal(out[look], full[:, None].expand_as(out)[look])  # the look block: every reward
    assert torch.equal(out[~look], outside[:, None].expand_as(out)[~look])  # elsewhere: accuracy alone
    # Without credit the advantages are GRPO's, one per completion.
    plain = RewardSuite({"look": LookReward(grid=8), "accuracy": PrecisionRecallReward()}, credit={})
    assert torch.equal(plain.advantages(scores, 3), full)
    with pytest.raises(ValueError, match="block_mask"):
        suite.advantages(scores, 3)


def test_credit_names_a_reward_and_a_block():
    rewards = {"look": LookReward(), "accuracy": PrecisionRecallReward()}
    for bad in ({"look": "nowhere"}, {"nope": "look"}):
        with pytest.raises(ValueError, match="credit"):
            RewardSuite(rewards, credit=bad)


def test_a_reward_credited_to_a_block_no_completion_writes_moves_nothing(tiny_qwen2_vl):
    # The tiny random policy writes no <look> block: its credited reward reaches no token, so a step with that
    # reward alone leaves the weights as they were, where the same step without credit moves them.
    from helpers import fit_one_step
    from test_module import DigitReward

    from dip_r1.models import PolicySpec
    from dip_r1.module import GRPOModule

    moved = {}
    for credit in (None, {"digits": "look"}):
        torch.manual_seed(0)
        module = GRPOModule(
            PolicySpec(tiny_qwen2_vl),
            rewards=RewardSuite({"digits": DigitReward()}, credit=credit),
            group_size=4,
            sampling=SamplingConfig(max_new_tokens=8),
            micro_batch_size=8,
            optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        )
        module.configure_model()
        before = [p.detach().clone() for p in module.policy.parameters()]
        fit_one_step(module)
        assert module.last_rollout.scores["digits"].std() > 0  # the reward did vary
        moved[bool(credit)] = any(not torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))
    assert moved == {False: True, True: False}
