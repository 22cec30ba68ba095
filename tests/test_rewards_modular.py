"""GroupReward metrics and RewardSuite, including YAML (class_path) instantiation of a user reward."""

import sys
import types

import jsonargparse
import pytest
import torch

from dip_r1.rewards import (
    FormatReward,
    GroupReward,
    LookReward,
    ParsedCompletion,
    PrecisionRecallReward,
    RewardSuite,
    parse_completion,
)


def completion(look: str, answer: str) -> str:
    return f"<think>t</think><look>{look}</look><answer>{answer}</answer>"


# Two prompts, group size 2, in a 4 x 4 coordinate space.
TARGETS = [
    {"boxes": torch.tensor([[0.0, 0, 2, 2]]), "ignore": torch.zeros((0, 4)), "image_size": (4, 4)},
    {
        "boxes": torch.tensor([[0.0, 0, 4, 4], [0, 0, 4, 2]]),
        "ignore": torch.zeros((0, 4)),
        "image_size": (4, 4),
    },
]
TEXTS = [
    completion("[[0, 0, 2, 2]]", "[[0, 0, 2, 2]]"),  # exact; looks where the group disagrees
    completion("[]", "[]"),  # finds nothing, looks nowhere
    completion("[[0, 0, 4, 4]]", "[[0, 0, 4, 4]]"),  # one of two found
    "no tags [[0, 0, 4, 4]]",  # malformed: no answer block
]
# look, prompt 0: answers cover the top-left quarter / nothing: U = .25 on 4 cells; the first looks
# exactly there: focus 1, coverage 1. Prompt 1: answer vs nothing: U = .25 everywhere; the third
# looks everywhere: 1 and 1. Accuracy: 1; 0 (gt, no pred); P 1, R 1/2 -> .75; 0 (no answer).
FORMAT = [1.0, 1.0, 1.0, 0.0]
LOOK = [1.0, 0.0, 1.0, 0.0]
ACCURACY = [1.0, 0.0, 0.75, 0.0]


def test_the_three_rewards_per_completion_and_their_means():
    parsed = [parse_completion(t) for t in TEXTS]
    for reward, expected in (
        (FormatReward(), FORMAT),
        (LookReward(grid=4, resolve=False), LOOK),
        (PrecisionRecallReward(), ACCURACY),
    ):
        values = reward(parsed, TARGETS, 2)
        assert values.dtype == torch.float32 and values.tolist() == expected
        reward(parsed[:2], TARGETS[:1], 2)  # a second batch
        assert reward.compute().item() == pytest.approx((sum(expected) + sum(expected[:2])) / 6)
        reward.reset()
        with pytest.warns(UserWarning, match="before the ``update``"):
            assert reward.compute().item() == 0.0


def test_precision_recall_reward_arguments_reach_the_function():
    parsed = [parse_completion(t) for t in TEXTS]
    reward = PrecisionRecallReward(precision_weight=1.0, recall_weight=3.0)
    assert reward(parsed, TARGETS, 2).tolist() == [1.0, 0.0, 0.625, 0.0]  # (1 + 3 * .5) / 4
    with pytest.raises(ValueError):
        PrecisionRecallReward(precision_weight=0.0, recall_weight=0.0)
    with pytest.raises(ValueError):
        LookReward(grid=0)


class CountingReward(GroupReward):
    """Scores the number of answer boxes, counting the calls to score()."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def score(self, completions, targets, group_size):
        self.calls += 1
        return torch.tensor([0.0 if c.answer is None else float(len(c.answer)) for c in completions])


def test_forward_scores_once_and_accumulates_sum_states():
    reward = CountingReward()
    parsed = [parse_completion(t) for t in TEXTS]
    assert reward(parsed, TARGETS, 2).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert reward.calls == 1  # torchmetrics' default forward would score twice
    assert reward._reductions["total"] is reward._reductions["count"]  # both summed over ranks
    assert (reward.total.item(), reward.count.item()) == (2.0, 4)
    assert reward.compute().item() == 0.5
    with pytest.raises(ValueError):
        reward(parsed, TARGETS, 3)  # 4 completions cannot be 2 prompts x 3


def test_mean_over_ranks():
    # Two ranks: this one and another whose states are (total 3, count 2); gathered then summed.
    other = {"total": torch.tensor(3.0), "count": torch.tensor(2)}
    gather = lambda t, group=None: [t, other["total"] if t.dtype.is_floating_point else other["count"]]  # noqa: E731
    reward = CountingReward(dist_sync_fn=gather, distributed_available_fn=lambda: True)
    reward([parse_completion(t) for t in TEXTS], TARGETS, 2)  # total 2, count 4
    assert reward.compute().item() == pytest.approx(5 / 6)


def test_suite_default_weights_and_total():
    suite = RewardSuite()
    assert list(suite.rewards) == ["format", "look", "accuracy"]
    # the look reward as measured to work beside the accuracy reward: resolved, credited to its block
    assert suite.rewards["look"].resolve and suite.credit == {"look": "look"}
    assert RewardSuite(credit={}).credit == {}
    # one rule whoever built the suite: a reward named "look" is credited to the look block unless told otherwise
    assert RewardSuite({"look": LookReward()}).credit == {"look": "look"}
    assert RewardSuite({"format": FormatReward()}).credit == {}
    assert isinstance(suite.rewards, torch.nn.ModuleDict)
    out = suite(TEXTS, TARGETS, 2)
    assert out["format"].tolist() == FORMAT and out["accuracy"].tolist() == ACCURACY
    assert out["total"].tolist() == pytest.approx(
        [f + lk + a for f, lk, a in zip(FORMAT, out["look"].tolist(), ACCURACY)]
    )
    means = suite.compute()
    assert means["format"].item() == 0.75 and means["accuracy"].item() == pytest.approx(1.75 / 4)
    assert means["total"].item() == pytest.approx(
        sum(means[k].item() for k in ("format", "look", "accuracy"))
    )
    suite.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert suite.compute()["format"].item() == 0.0


def test_suite_weights_and_parsed_input():
    suite = RewardSuite(
        {"format": FormatReward(), "accuracy": PrecisionRecallReward()},
        weights={"format": 0.5, "accuracy": 2.0},
    )
    parsed = [parse_completion(t) for t in TEXTS]
    assert all(isinstance(p, ParsedCompletion) for p in parsed)
    assert suite(parsed, TARGETS, 2)["total"].tolist() == [2.5, 0.5, 2.0, 0.0]  # .5 * format + 2 * accuracy
    with pytest.raises(ValueError):
        RewardSuite({"format": FormatReward()}, weights={"look": 1.0})
    with pytest.raises(ValueError):
        RewardSuite({"total": FormatReward()})


def test_look_reward_resolved_by_the_answer_inside_the_look():
    parsed = [parse_completion(t) for t in TEXTS]
    # Inside each look: completion 0 answers its one object exactly (1.0); completion 2 finds one of the
    # two objects whose centre is inside (.75); 1 and 3 have no look.
    values = LookReward(grid=4, resolve=True)(parsed, TARGETS, 2)
    assert values.tolist() == [1.0, 0.0, 0.75, 0.0]


def test_look_reward_unresolved_is_the_variance_term_alone():
    parsed = [parse_completion(t) for t in TEXTS]
    assert LookReward(grid=4, resolve=False)(parsed, TARGETS, 2).tolist() == LOOK
    # resolved, each value is the unresolved one times the accuracy inside the look: never above it
    resolved = LookReward(grid=4)(parsed, TARGETS, 2).tolist()
    assert all(r <= lk for r, lk in zip(resolved, LOOK))


class ThinkLengthReward(GroupReward):
    """A user reward: 1.0 when the think block has at least ``min_words`` words."""

    def __init__(self, min_words: int = 3, **kwargs):
        """
        Args:
            min_words: Least number of words of a rewarded think block.
        """
        super().__init__(**kwargs)
        self.min_words = min_words

    def score(self, completions, targets, group_size):
        return torch.tensor([float(len((c.think or "").split()) >= self.min_words) for c in completions])


YAML = """
suite:
  rewards:
    format:
      class_path: dip_r1.rewards.FormatReward
    accuracy:
      class_path: dip_r1.rewards.PrecisionRecallReward
      init_args:
        iou_threshold: 0.7
        recall_weight: 3.0
    thinking:
      class_path: user_rewards.ThinkLengthReward
      init_args:
        min_words: 1
  weights:
    thinking: 0.5
"""


def test_suite_from_yaml_with_a_user_reward(monkeypatch):
    module = types.ModuleType("user_rewards")
    module.ThinkLengthReward = ThinkLengthReward
    ThinkLengthReward.__module__ = "user_rewards"
    monkeypatch.setitem(sys.modules, "user_rewards", module)
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(RewardSuite, "suite")
    suite = parser.instantiate(parser.parse_string(YAML)).suite
    assert isinstance(suite, RewardSuite) and list(suite.rewards) == ["format", "accuracy", "thinking"]
    assert suite.rewards["accuracy"].iou_threshold == 0.7 and suite.rewards["accuracy"].recall_weight == 3.0
    assert suite.rewards["thinking"].min_words == 1
    assert suite.weights == {"format": 1.0, "accuracy": 1.0, "thinking": 0.5}
    out = suite(TEXTS, TARGETS, 2)
    assert out["thinking"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert out["total"].tolist() == pytest.approx(
        [2.5, 1.5, 1.5 + 2 / 3.5, 0.0]
    )  # accuracy (.5 + 3 * .5) / 3.5


def test_suite_defaults_from_yaml():
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(RewardSuite, "suite")
    suite = parser.instantiate(parser.parse_string("suite: {}")).suite
    assert list(suite.rewards) == ["format", "look", "accuracy"]
