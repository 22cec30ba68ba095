"""Dynamic sampling: flat groups (all G rewards equal) are left out and more prompts are drawn inside the step,
by hand on fake rollouts and in a real training run with rewards rigged so that half the groups are flat."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from fault_tools import train
from helpers import prompt_batch, toy_targets

from dip_r1 import grpo
from dip_r1.config import SamplingConfig
from dip_r1.dynamic_sampling import Drawn, fill_groups, split_rows, stack_rows
from dip_r1.models import PolicySpec
from dip_r1.module import GRPOModule
from dip_r1.rewards import GroupReward, RewardSuite
from dip_r1.rollout import Rollout

G = 2


def fake(name: str, flat: list[bool], length: int = 3) -> Drawn:
    """A drawn batch of ``len(flat)`` prompts whose groups are flat or not; its texts name batch and row."""
    n = len(flat) * G
    rollout = Rollout(
        prompt_index=torch.arange(len(flat)).repeat_interleave(G),
        completion_ids=torch.zeros(n, length, dtype=torch.long),
        mask=torch.ones(n, length, dtype=torch.bool),
        truncated=torch.zeros(n, dtype=torch.bool),
    )
    total = torch.tensor([0.5 if f else float(j) for f in flat for j in range(G)])
    texts = [f"{name}{j}" for j in range(n)]
    return Drawn({"inputs": {}, "targets": []}, rollout, texts, [None] * n, {"total": total})


def _flat(scores):
    return grpo.zero_std_mask(scores["total"], G).view(-1, G)[:, 0]


def _fill(first, later, max_draws=3):
    queue = list(later)

    def draw():
        if not queue:
            raise StopIteration
        return queue.pop(0)

    return fill_groups(first, draw, _flat, groups=2, group_size=G, max_draws=max_draws)


def test_fill_keeps_the_first_b_live_groups_in_drawing_order():
    filled = _fill(fake("a", [True, False]), [None, fake("b", [True, True]), fake("c", [False, False])])
    # a's second group, then (a batch that failed to load, b flat) c's first: c's second is beyond B
    assert [p.texts for p in filled.parts] == [["a2", "a3"], ["c0", "c1"]]
    assert filled.parts[1].rollout.prompt_index.tolist() == [0, 0]  # rows of c's own prompts
    assert (filled.resampled, filled.dropped) == (3, 4)  # a's flat, b's two, c's surplus
    assert [d.texts[0] for d in filled.drawn] == ["a0", "b0", "c0"]


def test_fill_stops_at_the_bound_or_the_end_of_the_stream():
    later = [fake("b", [True, True]), fake("c", [False, True])]
    bound = _fill(fake("a", [True, False]), later, max_draws=1)
    assert [p.texts for p in bound.parts] == [["a2", "a3"]] and (bound.resampled, bound.dropped) == (1, 3)
    ended = _fill(fake("a", [True, False]), [fake("b", [True, True])])
    assert [p.texts for p in ended.parts] == [["a2", "a3"]] and (ended.resampled, ended.dropped) == (1, 3)
    # nothing to learn from anywhere: the first batch as drawn
    none = _fill(fake("a", [True, True]), [fake("b", [True, True])], max_draws=1)
    assert [p.texts for p in none.parts] == [["a0", "a1", "a2", "a3"]] and none.dropped == 2
    # no flat group: no draw at all
    live = _fill(fake("a", [False, False]), [])
    assert live.resampled == 0 and live.dropped == 0 and live.parts[0].texts == ["a0", "a1", "a2", "a3"]


def test_rows_of_parts_of_different_lengths_stack_and_split_back():
    parts = [fake("a", [False], length=2), fake("b", [False, False], length=4)]
    masks = [p.rollout.mask for p in parts]
    stacked = stack_rows(masks)
    assert stacked.shape == (6, 4) and stacked[:2, 2:].sum() == 0
    weights = grpo.token_weights(stacked, "grpo")  # 1 / (len_i x N): the same as over the parts joined
    assert [w.shape for w in split_rows(weights, parts)] == [(2, 2), (4, 4)]
    torch.testing.assert_close(split_rows(weights, parts)[0], torch.full((2, 2), 1 / 12))
    assert [a.tolist() for a in split_rows(torch.arange(6.0), parts)] == [[0.0, 1.0], [2.0, 3.0, 4.0, 5.0]]


class RiggedReward(GroupReward):
    """Flat (0.5 for all G) on prompts whose target says ``flat``; else the row's rank in its group, so that
    every other group has spread. Records the tags of the prompts it scored."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[str] = []

    def score(self, completions, targets, group_size):
        self.seen += [t["tag"] for t in targets]
        return torch.tensor(
            [0.5 if t["flat"] else j / group_size for t in targets for j in range(group_size)]
        )


def _batches(processor) -> list[dict]:
    """Four batches of two prompts; groups flat (F) or live (L): FF, FL, LF, LL: half the groups are flat."""
    inputs = prompt_batch(processor)
    out = []
    for k, flags in enumerate(["FF", "FL", "LF", "LL"]):
        targets = [
            {**t, "flat": f == "F", "tag": f"{k}{i}"} for i, (t, f) in enumerate(zip(toy_targets(2), flags))
        ]
        out.append({"inputs": inputs, "targets": targets})
    return out


@pytest.mark.parametrize(
    ("bound", "trained", "resampled", "dropped"), [(3, [8, 8], [2, 0], [4, 0]), (1, [4, 8], [1, 1], [3, 2])]
)
def test_a_step_trains_on_b_live_groups_and_logs_the_counters(
    tiny_qwen2_vl, tmp_path, monkeypatch, bound, trained, resampled, dropped
):
    L.seed_everything(0)
    reward = RiggedReward()
    module = GRPOModule(
        PolicySpec(tiny_qwen2_vl),
        rewards=RewardSuite({"rigged": reward}),
        group_size=4,
        sampling=SamplingConfig(max_new_tokens=6),
        micro_batch_size=4,
        dynamic_sampling=True,
        max_resample_batches=bound,
    )
    module.configure_model()
    losses: list[list[torch.Tensor]] = []  # per step, the advantages of each micro-batch
    real_loss = grpo.grpo_loss

    def spy(logp, old, ref, advantages, weights, config, **kw):
        if not losses or module.global_step >= len(losses):
            losses.append([])
        losses[-1].append(advantages.detach().clone())
        return real_loss(logp, old, ref, advantages, weights, config, **kw)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    _, rows = train(module, _batches(module.processor), 2, tmp_path)

    # bound 3: step 1 draws FF, FL, LF and trains on the live groups of FL and LF; step 2 trains on LL.
    # bound 1: step 1 draws FF, FL and trains on FL's live group only; step 2 takes LF's live group, then draws LL
    # and keeps its first (its second is beyond B).
    assert [sum(len(a) for a in step) for step in losses] == trained
    for step in losses:
        groups = torch.cat(step).view(-1, 4)
        assert (groups.abs().sum(dim=1) > 0).all()  # no flat group reached the loss
    assert [float(r["train/resampled_batches"]) for r in rows] == resampled
    assert [float(r["train/dropped_groups"]) for r in rows] == dropped
    assert all(float(r["train/entropy"]) > 0 for r in rows)
    # the extra draws come from the stream in order: every batch once
    assert reward.seen == ["00", "01", "10", "11", "20", "21", "30", "31"]


def test_a_groups_rows_include_the_zoom_fields():
    d = fake("a", [False, False, False])
    r = d.rollout
    r.attention, r.positions = r.mask.clone(), torch.arange(3 * 6 * 3).view(3, 6, 3)
    r.crops, r.row_images, r.logprobs = (
        [[j] for j in range(6)],
        [[j // 2] for j in range(6)],
        torch.rand(6, 3),
    )
    r.image_features = torch.zeros(6, 5)  # per prompt in truth; never indexed by completion
    part = d.groups(torch.tensor([2, 0]), G).rollout
    assert part.prompt_index.tolist() == [2, 2, 0, 0]
    assert part.crops == [[4], [5], [0], [1]] and part.row_images == [[2], [2], [0], [0]]
    assert torch.equal(part.positions, r.positions[:, [4, 5, 0, 1]])
    assert torch.equal(part.logprobs, r.logprobs[[4, 5, 0, 1]]) and part.image_features is r.image_features
