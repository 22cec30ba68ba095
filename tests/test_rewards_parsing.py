"""parse_completion and format_reward: the answer format, robustness and caps."""

import json
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dip_r1.rewards import ParsedCompletion, parse_completion
from dip_r1.rewards.functional import format_reward
from dip_r1.rewards.parsing import INVALID_REGION, MAX_BOXES, MAX_CHARS

GOOD = (
    "<think>two people, one behind the other</think>\n"
    "<look>[[0, 0, 50, 50]]</look>\n"
    '<answer>[{"bbox_2d": [10, 20, 30, 40], "label": "person"}, {"bbox_2d": [5.5, 6, 7, 8.25], "label": "rider"}]'
    "</answer>"
)


def test_well_formed_completion_is_parsed_once_into_every_field():
    p = parse_completion(GOOD)
    assert isinstance(p, ParsedCompletion) and p.text == GOOD
    assert p.well_formed and format_reward(GOOD) == 1.0
    assert p.think == "two people, one behind the other"
    assert p.look.dtype == torch.float32 and p.look.tolist() == [[0.0, 0.0, 50.0, 50.0]]
    assert p.answer.tolist() == [[10.0, 20.0, 30.0, 40.0], [5.5, 6.0, 7.0, 8.25]]
    assert p.labels == ["person", "rider"]
    assert [GOOD[a:b] for a, b in p.answer_spans] == ["[10, 20, 30, 40]", "[5.5, 6, 7, 8.25]"]


@pytest.mark.parametrize(
    "text",
    [
        "<think>a</think><look>[]</look><answer>[]</answer>",  # empty lists allowed
        "  <think>a</think>\n\n<look>[]</look>\t<answer>[[1, 2, 3, 4]]</answer>\n",  # whitespace around
        "<think></think><look>[[1,2,3,4]]</look><answer>[[1, 2, 3, 4], [2, 2, 9, 9]]</answer>",  # plain lists
        '<think>x</think><look>[]</look><answer>[{"bbox_2d": [1, 2, 3, 4]}]</answer>',  # label optional
        "<think>x</think><look>[]</look><answer>[[1, 2, 3, NaN]]</answer>",  # json; the box is dropped
    ],
)
def test_format_reward_accepts(text):
    assert format_reward(text) == 1.0


@pytest.mark.parametrize(
    "text",
    [
        "<look>[]</look><answer>[]</answer>",  # no think
        "<think>a</think><answer>[]</answer>",  # no look
        "<think>a</think><look>[]</look>",  # no answer
        "<think>a</think><answer>[]</answer><look>[]</look>",  # wrong order
        "<think>a</think><look>[]</look><answer>[]</answer><answer>[]</answer>",  # two answers
        "<think>a<think>b</think><look>[]</look><answer>[]</answer>",  # two think openers
        "Sure! <think>a</think><look>[]</look><answer>[]</answer>",  # text outside the blocks
        "<think>a</think> so <look>[]</look><answer>[]</answer>",  # text between blocks
        "<think>a</think><look>[]</look><answer>[]</answer> done",  # text after
        "<think>a</think><look>[[1, 2, 3, 4]</look><answer>[]</answer>",  # look not JSON
        "<think>a</think><look>[]</look><answer>[[1, 2, 3]]</answer>",  # 3 numbers
        '<think>a</think><look>[]</look><answer>[[1, 2, 3, "4"]]</answer>',  # a string number
        "<think>a</think><look>[]</look><answer>[[1, 2, 3, true]]</answer>",  # a boolean
        '<think>a</think><look>[]</look><answer>[{"box": [1, 2, 3, 4]}]</answer>',  # no bbox_2d
        "<think>a</think><look>[]</look><answer>{}</answer>",  # not a list
        "<think>a</think><look>[]</look><answer>[[1, 2, 3, 4]]",  # unclosed
        "",
    ],
)
def test_format_reward_rejects(text):
    assert format_reward(text) == 0.0
    assert not parse_completion(text).well_formed


def test_invalid_boxes_are_dropped_with_their_labels_and_spans():
    text = (
        '<think>x</think><look>[]</look><answer>[{"bbox_2d": [5, 5, 1, 9], "label": "a"}, '  # x2 <= x1
        '{"bbox_2d": [0, 0, 2, 2], "label": "b"}, {"bbox_2d": [0, 3, 4, 3], "label": "c"}, '  # y2 <= y1
        '{"bbox_2d": [0, 0, Infinity, 2], "label": "d"}, {"bbox_2d": [0, 0, 1e39, 2], "label": "e"}]</answer>'
    )  # 1e39 overflows float32: dropped too
    p = parse_completion(text)
    assert p.well_formed
    assert p.answer.tolist() == [[0.0, 0.0, 2.0, 2.0]] and p.labels == ["b"]
    assert [text[a:b] for a, b in p.answer_spans] == ["[0, 0, 2, 2]"]


def test_regex_fallback_keeps_complete_boxes_of_a_truncated_answer():
    text = '<think>x</think><look>[[0, 0, 9, 9]]</look><answer>[{"bbox_2d": [1, 2, 3, 4], "label": "p"}, {"bbox_2d": [5, 6, 7'
    p = parse_completion(text)
    assert not p.well_formed
    assert p.answer.tolist() == [[1.0, 2.0, 3.0, 4.0]] and p.labels is None
    assert [text[a:b] for a, b in p.answer_spans] == ["[1, 2, 3, 4]"]
    assert p.look.tolist() == [[0.0, 0.0, 9.0, 9.0]]  # the unclosed answer does not leak into look


def test_unclosed_look_stops_at_the_answer_block():
    p = parse_completion("<think>x</think><look>[[0, 0, 9, 9]<answer>[[1, 2, 3, 4]]</answer>")
    assert p.look.tolist() == [[0.0, 0.0, 9.0, 9.0]] and p.answer.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_missing_blocks_are_none():
    p = parse_completion("I see three people.")
    assert (p.think, p.look, p.answer, p.labels, p.answer_spans, p.well_formed) == (None,) * 5 + (False,)


def test_caps_on_box_count_and_length():
    many = json.dumps([[0, 0, 1, 1]] * 600)
    p = parse_completion(f"<think>x</think><look>[]</look><answer>{many}</answer>")
    assert len(p.answer) == MAX_BOXES and len(p.answer_spans) == MAX_BOXES and p.well_formed
    long = "<think>" + "a" * MAX_CHARS + "</think><look>[]</look><answer>[]</answer>"
    assert not parse_completion(long).well_formed  # only the first MAX_CHARS characters are read


def _assert_consistent(p: ParsedCompletion) -> None:
    for boxes in (p.look, p.answer):
        if boxes is not None:
            assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
            assert torch.isfinite(boxes).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert len(boxes) <= MAX_BOXES
    if p.answer_spans is not None:
        assert len(p.answer_spans) == len(p.answer)
    if p.labels is not None:
        assert len(p.labels) == len(p.answer)
    if p.answer is None:
        assert p.regions is None
    else:
        assert len(p.regions) == len(p.answer)
        assert all(r is None or (type(r) is int and r >= 0) for r in p.regions)


ADVERSARIAL = {
    "100k boxes": "<think>x</think><look>[]</look><answer>"
    + json.dumps([[1, 2, 3, 4]] * 100_000)
    + "</answer>",
    "100k dicts": "<answer>["
    + ",".join(['{"bbox_2d": [1, 2, 3, 4], "label": "p"}'] * 100_000)
    + "]</answer>",
    "nan inf": "<think>x</think><look>[[NaN, 0, 1, 1]]</look><answer>[[0, 0, Infinity, 1], [-Infinity, 0, 1, 1]]</answer>",
    "nested 10k": "<think>x</think><look>[]</look><answer>"
    + "[" * 10_000
    + "1, 2, 3, 4"
    + "]" * 10_000
    + "</answer>",
    "nested unclosed": "<answer>" + "[" * 10_000,
    "unicode": "<think>人群 🧍‍♂️🧍 \u202e\x00</think><look>[[０, 1, 2, 3]]</look><answer>[[1, 2, 3, 4], ['é']]</answer>",
    "truncated json": '<think>x</think><look>[]</look><answer>[{"bbox_2d": [1, 2, 3, 4], "label": "per',
    "huge numbers": "<answer>[[1, 2, 3, "
    + "9" * 5000
    + "], [1, 2, 1e999999, 4], [10"
    + "0" * 400
    + ", 1, 2, 3]]</answer>",
    "many openers": "<think>" * 5000 + "<look>" * 5000,
    "digit runs": "<answer>" + "[1" * 10_000,
    "surrogates": "<answer>[[1, 2, 3, 4]]\ud800</answer>",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_strings_do_not_raise_nor_stall(name):
    start = time.perf_counter()
    p = parse_completion(ADVERSARIAL[name])
    assert time.perf_counter() - start < 2.0  # a generous bound: the caps make these milliseconds
    _assert_consistent(p)


def test_adversarial_expected_contents():
    assert len(parse_completion(ADVERSARIAL["100k boxes"]).answer) == MAX_BOXES
    p = parse_completion(ADVERSARIAL["nan inf"])
    assert p.well_formed and p.look.shape == (0, 4) and p.answer.shape == (0, 4)
    nested = parse_completion(ADVERSARIAL["nested 10k"])  # too deep for JSON: the regex finds the box
    assert not nested.well_formed and nested.answer.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert parse_completion(ADVERSARIAL["huge numbers"]).answer.shape == (0, 4)
    assert not parse_completion(ADVERSARIAL["unicode"]).well_formed
    assert parse_completion(None).text == "" and not parse_completion(b"<answer>").well_formed


FRAGMENTS = st.sampled_from(
    ["<think>", "</think>", "<look>", "</look>", "<answer>", "</answer>", "[", "]", "{", "}", ",", " ", "\n",
     '"bbox_2d":', '"label":', '"region":', '"p"', "1", "-2.5", "1e3", "NaN", "Infinity", "0", "100", "人", "\\", '"']
)  # fmt: skip


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.one_of(st.text(max_size=300), st.lists(FRAGMENTS, max_size=80).map("".join)))
def test_parse_never_raises_and_is_consistent(text):
    p = parse_completion(text)
    _assert_consistent(p)
    assert format_reward(text) == float(p.well_formed)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(st.integers(0, 500), st.integers(0, 500), st.integers(1, 80), st.integers(1, 80)),
        max_size=20,
    )
)
def test_round_trip_of_generated_answers(rows):
    boxes = [[x, y, x + w, y + h] for x, y, w, h in rows]
    answer = json.dumps([{"bbox_2d": b, "label": "person"} for b in boxes])
    text = f"<think>t</think> <look>{json.dumps(boxes[:2])}</look> <answer>{answer}</answer>"
    p = parse_completion(text)
    assert p.well_formed and p.answer.tolist() == [[float(v) for v in b] for b in boxes]
    assert [json.loads(text[a:b]) for a, b in p.answer_spans] == boxes


def test_regions_are_kept_per_answer_row_and_invalid_ones_marked():
    answer = [
        {"bbox_2d": [1, 2, 3, 4], "label": "a", "region": 2},
        {"bbox_2d": [5, 5, 1, 9], "label": "b", "region": 1},  # dropped: x2 <= x1, with its region
        {"region": 1, "bbox_2d": [0, 0, 9, 9], "label": "c"},  # the key may come first
        {"bbox_2d": [1, 1, 2, 2], "label": "d"},
    ] + [{"bbox_2d": [1, 1, 2, 2], "label": "e", "region": bad} for bad in (0, -1, 2.5, "1", True, None, {})]
    text = f"<think>x</think><look>[]</look><answer>{json.dumps(answer)}</answer>"
    p = parse_completion(text)
    assert p.well_formed  # the parser does not judge regions: resolve_regions does, against the crops
    assert p.labels == ["a", "c", "d"] + ["e"] * 7
    assert p.regions == [2, 1, None] + [INVALID_REGION] * 7
    assert [text[a:b] for a, b in p.answer_spans[:3]] == ["[1, 2, 3, 4]", "[0, 0, 9, 9]", "[1, 1, 2, 2]"]
    assert parse_completion(GOOD).regions == [None, None]
    assert parse_completion("<answer>[[1, 2, 3, 4]]</answer>").regions == [None]


def test_regions_of_a_truncated_answer_come_from_each_object():
    text = (
        '<think>x</think><look>[]</look><answer>[{"region": 2, "bbox_2d": [1, 2, 3, 4]}, [0, 0, 5, 5], '
        '{"bbox_2d": [1, 2, 3, 9], "label": "p"}, {"bbox_2d": [2, 2, 3, 3], "region": "x"}, '
        '{"bbox_2d": [1, 1, 3, 4], "region": 3'
    )
    p = parse_completion(text)
    assert not p.well_formed and len(p.answer) == 5
    assert p.regions == [2, None, None, INVALID_REGION, 3]
