"""Evaluation: box scores from token log-probs, per-dataset metrics, validate / test / predict on a tiny model,
and the training callbacks' pictures and tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import quiet_trainer, synthetic_crowd
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from dip_r1 import report
from dip_r1.callbacks import CompletionsTable, GroupPictures, PredictionWriter
from dip_r1.config import SamplingConfig
from dip_r1.data import DetectionDataModule
from dip_r1.evaluation import Decoded, DetectionEvaluator, make_predictions, span_scores, token_char_ends
from dip_r1.grpo import token_logprobs
from dip_r1.models import LoraSpec, PolicySpec
from dip_r1.module import GRPOModule

ROOT = Path(__file__).resolve().parents[1]


class PieceTokenizer:
    """A tokenizer whose token ``i`` is the string ``pieces[i]`` (``batch_decode`` joins them)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(self.pieces[i] for i in row) for row in rows]


def _target(orig=(200, 100), coordinates="relative-1000", dataset="crowd", boxes=None, image_id="a"):
    return {
        "boxes": torch.zeros(0, 4) if boxes is None else torch.tensor(boxes, dtype=torch.float32),
        "ignore": torch.zeros(0, 4),
        "image_size": (1000, 1000) if coordinates == "relative-1000" else orig,
        "orig_size": orig,
        "resized_size": orig,
        "coordinates": coordinates,
        "dataset": dataset,
        "image_id": image_id,
    }


def test_box_score_is_the_mean_log_probability_of_the_tokens_that_spell_it():
    pieces = [
        "<think>two</think><look>[]</look><answer>[",  # 0
        "[100, 100",  # 1: first half of box 1
        ", 500, 500]",  # 2: second half of box 1
        ", ",  # 3: between the boxes, spells no box
        "[600, 100, 900, 900]",  # 4: box 2, one token
        "]</answer>",  # 5
    ]
    ids = [0, 1, 2, 3, 4, 5]
    probs = [0.9, 0.5, 0.125, 0.01, 0.8, 0.7]  # the probability the model gave each token
    # logits whose softmax gives token ids[k] probability probs[k] (the rest shared by the other 5 tokens)
    logits = torch.full((1, 6, 6), 0.0)
    for k, p in enumerate(probs):
        logits[0, k] = math.log((1 - p) / 5)
        logits[0, k, ids[k]] = math.log(p)
    logp = token_logprobs(logits, torch.tensor([ids]))[0]
    tokenizer = PieceTokenizer(pieces)
    text = "".join(pieces)
    (p,) = make_predictions(tokenizer, [Decoded(text, ids, logp)], [_target()])
    assert p.parsed.well_formed and p.parsed.answer.tolist() == [[100, 100, 500, 500], [600, 100, 900, 900]]
    # box 1 is spelled by tokens 1 and 2: (log 0.5 + log 0.125) / 2 = log 0.25; box 2 by token 4 alone
    torch.testing.assert_close(p.scores, torch.tensor([math.log(0.25), math.log(0.8)]))
    # relative-1000 on a 200 x 100 original: x / 5, y / 10
    assert p.boxes.tolist() == [[20.0, 10.0, 100.0, 50.0], [120.0, 10.0, 180.0, 90.0]]


def test_char_ends_of_a_real_tokenizer_split_the_text_back_into_its_tokens(tiny_qwen2_vl):
    from dip_r1.models import load_processor

    tok = load_processor(tiny_qwen2_vl).tokenizer
    text = '<think>two people</think><look>[]</look><answer>[{"bbox_2d": [12, 3, 40, 77], "label": "person"}]</answer>'
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # EOS decodes to nothing
    ends = token_char_ends(tok, ids)
    assert ends[-1] == ends[-2] == len(text)
    starts = [0, *ends[:-1]]
    assert [text[s:e] for s, e in zip(starts, ends)][:-1] == [tok.decode([i]) for i in ids[:-1]]
    # one log-prob per token, equal to the token's index: the score of a span is the mean of the indices
    box = text.index("[12")
    span = (box, box + len("[12, 3, 40, 77]"))
    covering = [k for k, (s, e) in enumerate(zip(starts, ends)) if s < span[1] and e > span[0]]
    expected = sum(covering) / len(covering)
    assert span_scores(torch.arange(len(ids), dtype=torch.float32), ends, [span]).item() == pytest.approx(
        expected
    )


def test_evaluator_reports_each_dataset_in_original_pixels():
    tokenizer = PieceTokenizer(["x"])
    good = "<think>.</think><look>[]</look><answer>[[100, 100, 500, 500]]</answer>"
    bad = "[[600, 600, 700, 700]] no tags"
    decoded = [Decoded(good, [0], torch.tensor([-0.1])), Decoded(bad, [0], torch.tensor([-0.2]))]
    targets = [
        _target(dataset="a", boxes=[[100, 100, 500, 500], [600, 600, 900, 900]]),
        _target(dataset="b", boxes=[[600, 600, 700, 700]], coordinates="absolute"),
    ]
    evaluator = DetectionEvaluator()
    evaluator.update(make_predictions(tokenizer, decoded, targets))
    results = evaluator.compute()
    assert set(results) == {"a", "b"}
    a, b = results["a"], results["b"]
    assert (a["precision"], a["recall"], a["format_valid"], a["images"]) == (1.0, 0.5, 1.0, 1.0)
    assert a["count_mae"] == 1.0 and a["mean_iou"] == pytest.approx(1.0)
    assert (a["duplicate_ratio"], a["look_boxes"], b["duplicate_ratio"], b["look_boxes"]) == (
        0.0,
        0.0,
        0.0,
        0.0,
    )
    assert (b["precision"], b["recall"], b["format_valid"], b["mr2"]) == (
        0.0,
        0.0,
        0.0,
        1.0,
    )  # no answer block
    assert report.flatten(results, "val")["val/a/recall"] == 0.5


def test_evaluator_counts_repeated_answer_boxes_and_look_boxes():
    tokenizer = PieceTokenizer(["x"])
    # 3 answer boxes, the second a repeat of the first (IoU .9); then 1 box, no repeat. Looks: 2, then 0.
    first = (
        "<think>.</think><look>[[0, 0, 10, 10], [5, 5, 9, 9]]</look>"
        "<answer>[[100, 100, 200, 200], [100, 100, 200, 190], [300, 300, 400, 400]]</answer>"
    )
    second = "<think>.</think><look>[]</look><answer>[[100, 100, 200, 200]]</answer>"
    decoded = [Decoded(t, [0], torch.tensor([-0.1])) for t in (first, second)]
    targets = [_target(dataset="a", boxes=[[100, 100, 200, 200]]) for _ in range(2)]
    evaluator = DetectionEvaluator()
    evaluator.update(make_predictions(tokenizer, decoded, targets))
    a = evaluator.compute()["a"]
    assert a["duplicate_ratio"] == pytest.approx(1 / 4)  # of all 4 answer boxes
    assert a["look_boxes"] == 1.0


def test_table_shows_base_trained_and_difference(capsys):
    trained = {"crowd": {"f1": 0.5, "mr2": 0.6, "images": 3}}
    base = {"crowd": {"f1": 0.25, "mr2": 0.8, "images": 3}}
    report.print_metrics(trained, base, title="val")
    out = capsys.readouterr().out
    assert "base" in out and "trained" in out and "difference" in out
    assert "+0.250" in out and "-0.200" in out


def _trainer(tmp_path, **kw):
    return quiet_trainer(logger=kw.pop("logger", CSVLogger(tmp_path / "logs", name="run")), **kw)


def test_validate_logs_and_prints_metrics_per_dataset_and_compares_with_the_base(
    tiny_model, tmp_path, capsys
):
    L.seed_everything(0)
    module = GRPOModule(
        PolicySpec(tiny_model, lora=LoraSpec(r=4)),
        sampling=SamplingConfig(max_new_tokens=12),
        compare_base=True,
        micro_batch_size=4,
    )
    data = DetectionDataModule(val=[synthetic_crowd(tmp_path, "crowd", 1, n=3)], batch_size=2)
    data.connect(module.processor, **module.data_spec())
    (logged,) = _trainer(tmp_path).validate(module, data)
    for metric in report.METRIC_COLUMNS:
        assert f"val/crowd/{metric}" in logged and f"val_base/crowd/{metric}" in logged, metric
    assert logged["val/crowd/images"] == 3
    # fresh LoRA adapters are zero: the trained and the base model answer alike
    assert logged["val/crowd/count_mae"] == logged["val_base/crowd/count_mae"]
    out = capsys.readouterr().out
    assert "val: greedy answers" in out and "difference" in out and "format valid" in out


def test_predict_writes_pictures_and_jsonl_with_rewards_when_ground_truth_is_known(tiny_qwen2_vl, tmp_path):
    L.seed_everything(0)
    module = GRPOModule(
        PolicySpec(tiny_qwen2_vl),
        sampling=SamplingConfig(max_new_tokens=12),
    )
    annotated = synthetic_crowd(tmp_path, "crowd", 2, n=2)
    list(annotated)  # generate it, so that its images can be predicted on as a plain folder too
    data = DetectionDataModule(
        predict=[annotated], predict_images=str(tmp_path / "crowd" / "Images" / "*.jpg"), batch_size=2
    )
    data.connect(module.processor, **module.data_spec())
    writer = PredictionWriter(output_dir=str(tmp_path / "out"))
    _trainer(tmp_path, callbacks=[writer]).predict(module, data, return_predictions=False)
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and len(list((tmp_path / "out").glob("*.png"))) == 4
    for line in lines:
        assert (tmp_path / "out" / line["image"]).is_file()
        assert isinstance(line["completion"], str) and line["orig_size"] == [112, 84]
        assert len(line["boxes"]) == len(line["scores"])
    known = [x for x in lines if x["dataset"] == "crowd"]
    unknown = [x for x in lines if x["dataset"] == "images"]
    assert len(known) == len(unknown) == 2
    assert all(set(x["rewards"]) == {"total", "format", "look", "accuracy"} for x in known)
    assert all(x["rewards"] is None for x in unknown)


def test_callbacks_draw_the_group_and_print_the_completions(tiny_qwen2_vl, tmp_path, capsys):
    L.seed_everything(0)
    module = GRPOModule(
        PolicySpec(tiny_qwen2_vl),
        group_size=4,
        sampling=SamplingConfig(max_new_tokens=12),
        micro_batch_size=8,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
    )
    data = DetectionDataModule(train=[synthetic_crowd(tmp_path, "crowd", 3)], batch_size=2)
    data.connect(module.processor, **module.data_spec())
    pictures = GroupPictures(every_n_steps=2, min_size=168)
    loggers = [CSVLogger(tmp_path / "logs", name="run"), TensorBoardLogger(tmp_path / "tb", name="run")]
    trainer = _trainer(
        tmp_path, logger=loggers, max_steps=3, callbacks=[pictures, CompletionsTable(every_n_steps=2, n=3)]
    )
    trainer.fit(module, data)
    # batches 0 and 2, written next to the CSV metrics
    folder = Path(loggers[0].log_dir) / "group_pictures"
    assert sorted(p.name for p in folder.glob("*.png")) == ["step_000000.png", "step_000002.png"]
    from PIL import Image

    with Image.open(folder / "step_000000.png") as image:
        assert image.size == (2 * 224 + 4, 168)  # 112 x 84 enlarged twice, two panels and the gap
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    out = capsys.readouterr().out
    assert out.count("completions at step") == 2
    for column in ("completion", "total", "format", "look", "accuracy"):
        assert column in out
    assert module.last_rollout is not None and len(module.last_rollout.texts) == 8


def test_every_built_in_dataset_has_an_evaluation_recipe():
    names = {p.stem for p in (ROOT / "recipes" / "eval").glob("*.yaml")} - {"base"}
    assert names == {"crowdhuman", "citypersons", "widerperson", "wider_pedestrian", "uavdt", "coco"}
