"""Fuzzing what the policy's answers and the data feed into the rewards and the metrics: arbitrary text,
arbitrary boxes (inverted, empty, huge, negative, NaN, infinite). Nothing raises; every value is finite and in
its range. (parse_completion and format_reward on arbitrary text, and the functional rewards on well-formed
boxes, are fuzzed in tests/test_rewards_*.py.)"""

from __future__ import annotations

import json
import math

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dip_r1.data.prompts import COORDINATES, smart_resize
from dip_r1.metrics import DetectionMetrics
from dip_r1.rewards import FormatReward, LookReward, PrecisionRecallReward, Ramp, RewardSuite
from dip_r1.rewards.functional import look_reward, precision_recall_reward
from dip_r1.rewards.parsing import parse_completion
from dip_r1.zoom import crop_regions, resolve_regions

FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

anything = st.floats(allow_nan=True, allow_infinity=True, width=32)
plausible = st.one_of(st.integers(-50, 1100).map(float), st.floats(-1e6, 1e6, width=32))


def boxes(values=anything, max_size=6):
    """``Tensor[N, 4]`` float32 boxes with coordinates drawn from ``values`` (no ordering enforced)."""
    return st.lists(st.lists(values, min_size=4, max_size=4), max_size=max_size).map(
        lambda rows: torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)
    )


def json_box(values=plausible):
    return st.lists(st.one_of(values, st.just(float("nan")), st.just(1e300)), min_size=4, max_size=4)


@st.composite
def completion(draw) -> str:
    """Arbitrary text, or a Think-Look-Answer answer with arbitrary numbers, parts cut or shuffled."""
    if draw(st.booleans()):
        return draw(st.text(max_size=200))
    look = draw(st.lists(json_box(), max_size=3))
    answer = [
        {"bbox_2d": b, "label": draw(st.sampled_from(["person", "", "人"]))}
        for b in draw(st.lists(json_box(), max_size=5))
    ]
    parts = [
        f"<think>{draw(st.text(max_size=20))}</think>",
        f"<look>{json.dumps(look)}</look>",
        f"<answer>{json.dumps(answer)}</answer>",
    ]
    if draw(st.booleans()):
        parts = draw(st.permutations(parts))
    text = "".join(parts)
    return text[: draw(st.integers(0, len(text)))] if draw(st.booleans()) else text


@st.composite
def target(draw) -> dict:
    width, height = draw(st.integers(1, 2000)), draw(st.integers(1, 2000))
    return {
        "boxes": draw(boxes(plausible)),
        "ignore": draw(boxes(plausible, max_size=2)),
        "image_size": (width, height),
    }


@settings(FUZZ, max_examples=400)
@given(st.integers(1, 4), st.lists(target(), min_size=1, max_size=2), st.data())
def test_reward_suite_on_arbitrary_answers(group_size, targets, data):
    texts = data.draw(
        st.lists(completion(), min_size=group_size * len(targets), max_size=group_size * len(targets))
    )
    suite = RewardSuite(
        {
            "format": FormatReward(),
            "look": LookReward(grid=8),
            "accuracy": PrecisionRecallReward(
                iou_threshold=Ramp(0.3, 0.9, 50), iou_weighted=True, duplicate_penalty=1.0
            ),
        }
    )
    suite.set_step(data.draw(st.integers(0, 100)))
    _assert_rewards_in_range(suite(texts, targets, group_size), len(texts))


def _assert_rewards_in_range(scores: dict, n: int) -> None:
    """The default suite's scores: one finite value per completion, each reward in [0, 1], the total in [0, 3]."""
    assert set(scores) == {"total", "format", "look", "accuracy"}
    for name, value in scores.items():
        assert value.shape == (n,) and torch.isfinite(value).all(), name
    assert set(scores["format"].tolist()) <= {0.0, 1.0}
    for name in ("look", "accuracy"):
        assert ((scores[name] >= 0) & (scores[name] <= 1 + 1e-6)).all(), name
    assert ((scores["total"] >= 0) & (scores["total"] <= 3 + 1e-5)).all()


# Look boxes a policy may write: on the image, off it, zero-area, NaN, 1e12; 50 of them; unclosed tags.
LOOK_VALUES = st.one_of(
    st.sampled_from([0.0, 1000.0, -50.0, 5000.0, 1e12, -1e12, float("nan"), float("inf")]),
    st.floats(-100, 1200, width=32),
)
REGIONS = st.sampled_from([None, None, 1, 1, 2, 0, -1, 99, 2.5, "1", True])


@st.composite
def zoom_completion(draw) -> str:
    """A Think-Look-Answer text with adversarial look boxes and answer objects naming regions, maybe cut."""
    look = draw(st.lists(st.lists(LOOK_VALUES, min_size=4, max_size=4), max_size=4))
    if draw(st.booleans()):
        look.append([look[0][0], look[0][1]] * 2 if look else [10.0, 10.0, 10.0, 10.0])  # zero area
    if draw(st.integers(0, 4)) == 0:
        look = [[1.0, 2.0, 300.0, 200.0]] * 50
    answer = []
    for box in draw(st.lists(json_box(), max_size=5)):
        region = draw(REGIONS)
        answer.append({"bbox_2d": box, "label": "person"} | ({} if region is None else {"region": region}))
    text = f"<think>t</think>\n<look>{json.dumps(look)}</look>\n<answer>{json.dumps(answer)}</answer>"
    cut = draw(st.sampled_from(["", "</look>", "</answer>", "<answer>"]))
    text = text.replace(cut, "", 1) if cut else text
    return text[: draw(st.integers(0, len(text)))] if draw(st.integers(0, 3)) == 0 else text


@st.composite
def zoom_target(draw) -> dict:
    """A prompt's target in one family's convention, with the sizes the crops are computed from."""
    coordinates = draw(st.sampled_from(COORDINATES))
    side = st.one_of(st.integers(16, 2000), st.sampled_from([8000, 12000]))  # a sliver of a tall image
    width, height = draw(side), draw(side)
    assume(max(width, height) / min(width, height) <= 200)  # the prompt builder refuses the others
    h, w = smart_resize(height, width, 32, 1024, 160 * 120)
    space = (w, h) if coordinates == "absolute" else (1000, 1000)
    return {
        "boxes": draw(valid_boxes()),
        "ignore": draw(valid_boxes(2)),
        "image_size": space,
        "orig_size": (width, height),
        "resized_size": (w, h),
        "coordinates": coordinates,
    }


@settings(FUZZ, max_examples=300)
@given(st.integers(1, 3), st.lists(zoom_target(), min_size=1, max_size=2), st.data())
def test_zoom_looks_and_regions_through_crops_and_rewards(group_size, targets, data):
    n = group_size * len(targets)
    texts = data.draw(st.lists(zoom_completion(), min_size=n, max_size=n))
    resolved = []
    for j, text in enumerate(texts):
        target = targets[j // group_size]
        parsed = parse_completion(text)
        crops = crop_regions(
            parsed.look if "</look>" in text else None,
            target,
            max_looks=2,
            min_side=32,
            factor=32,
            min_pixels=1024,
            max_pixels=160 * 120,
        )
        assert len(crops) <= 2
        for crop in crops:
            x1, y1, x2, y2 = crop.box
            assert 0 <= x1 < x2 <= target["orig_size"][0] and 0 <= y1 < y2 <= target["orig_size"][1]
            assert min(crop.size) >= 32 and crop.size[0] * crop.size[1] <= 160 * 120
        out = resolve_regions(parsed, crops)
        if out.answer is not None:
            assert torch.isfinite(out.answer).all() and len(out.regions) == len(out.answer)
            assert all(r is None or 1 <= r <= len(crops) for r in out.regions)
        resolved.append(out)
    _assert_rewards_in_range(RewardSuite()(resolved, targets, group_size), n)


@settings(FUZZ, max_examples=1000)
@given(boxes(), boxes(), boxes(max_size=2), st.floats(0.05, 1.0), st.booleans(), st.floats(0.0, 1.0))
def test_precision_recall_reward_on_arbitrary_boxes(pred, gt, ignore, threshold, iou_weighted, penalty):
    value = precision_recall_reward(
        pred, gt, ignore, iou_threshold=threshold, iou_weighted=iou_weighted, duplicate_penalty=penalty
    )
    assert math.isfinite(value) and 0.0 <= value <= 1.0


@settings(FUZZ, max_examples=800)
@given(
    st.lists(st.one_of(st.none(), boxes()), min_size=1, max_size=6),
    st.data(),
    st.tuples(st.floats(1e-3, 1e5), st.floats(1e-3, 1e5)),
)
def test_look_reward_on_arbitrary_boxes(answers, data, size):
    looks = data.draw(st.lists(st.one_of(st.none(), boxes()), min_size=len(answers), max_size=len(answers)))
    value = look_reward(answers, looks, size, grid=8)
    assert value.shape == (len(answers),) and torch.isfinite(value).all()
    assert ((value >= 0) & (value <= 1 + 1e-6)).all()


def valid_boxes(max_size=6):
    """Ground truth as the data side delivers it: finite boxes of positive size (clipped, empty ones dropped)."""
    row = st.tuples(st.floats(0, 2000), st.floats(0, 2000), st.floats(0.5, 500), st.floats(0.5, 500))
    return st.lists(row, max_size=max_size).map(
        lambda rows: torch.tensor([[x, y, x + w, y + h] for x, y, w, h in rows], dtype=torch.float32).reshape(
            -1, 4
        )
    )


@st.composite
def detections(draw) -> dict:
    found = draw(boxes())
    scores = draw(st.lists(st.floats(0, 1), min_size=len(found), max_size=len(found)))
    return {"boxes": found, "scores": torch.tensor(scores, dtype=torch.float32)}


@settings(FUZZ, max_examples=150)
@given(
    st.lists(
        st.tuples(detections(), st.fixed_dictionaries({"boxes": valid_boxes(), "ignore": valid_boxes(2)})),
        min_size=1,
        max_size=3,
    )
)
def test_detection_metrics_on_arbitrary_boxes(images):
    metric = DetectionMetrics(iou_thresholds=[0.5, 0.75])
    metric.update([p for p, _ in images], [t for _, t in images])
    out = metric.compute()
    people = sum(len(t["boxes"]) for _, t in images)
    for name, value in out.items():
        value = value.item()
        if name in ("ap", "ap50", "mr2") and people == 0:
            assert math.isnan(value), name  # undefined without people, by convention
            continue
        assert math.isfinite(value), name
        if name != "count_mae":
            assert 0.0 <= value <= 1.0 + 1e-6, name
    assert out["count_mae"].item() >= 0
