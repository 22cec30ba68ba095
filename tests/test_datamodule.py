"""The DataModule: collate, bad batches, exact resume through Lightning, epochs, YAML, predict, a real processor."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

from dip_r1.data import DetectionCollate, DetectionDataModule, DetectionPromptBuilder, DetectionSample
from dip_r1.preflight import InputError


class FakeTokenizer:
    padding_side = "right"


class FakeProcessor:
    """What the collate needs of a Hugging Face processor: one token per word, one row per image size."""

    image_processor = None

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        parts = [c.get("text", "<image>") for m in messages for c in m["content"]]
        return " ".join([*parts, "assistant:"])

    def __call__(self, text, images, padding, return_tensors):
        lengths = [len(t.split()) for t in text]
        width = max(lengths)
        mask = torch.zeros(len(text), width, dtype=torch.long)
        for row, n in enumerate(lengths):
            if self.tokenizer.padding_side == "left":
                mask[row, width - n :] = 1
            else:
                mask[row, :n] = 1
        return {
            "input_ids": mask * 7,
            "attention_mask": mask,
            "image_sizes": torch.tensor([i.size for i in images]),
        }


def _samples(tmp_path: Path, n: int, size: tuple[int, int] = (60, 40)) -> list[DetectionSample]:
    image = tmp_path / "img.png"
    Image.new("RGB", size, (10, 120, 30)).save(image)
    return [
        DetectionSample(
            f"s{i}", image, 60, 40, boxes=[[0.0, 0.0, 30.0, 20.0]] * (i % 3), labels=["person"] * (i % 3)
        )
        for i in range(n)
    ]


def _module(train, **kwargs) -> DetectionDataModule:
    dm = DetectionDataModule(train=train, **kwargs)
    dm.connect(FakeProcessor())
    return dm


def _delivered(dm: DetectionDataModule, n: int) -> list:
    """The first ``n`` batches as the training loop receives them."""
    return [dm.on_before_batch_transfer(b, 0) for b in itertools.islice(dm.train_dataloader(), n)]


def test_collate_pads_left_and_keeps_targets(tmp_path):
    dm = _module([_samples(tmp_path, 4)], batch_size=2, shuffle_buffer=0)
    dm.connect(FakeProcessor(), coordinates="relative-1000")
    (batch,) = _delivered(dm, 1)
    assert batch["prompts"][0].startswith("You are a careful") and batch["prompts"][0].endswith("assistant:")
    assert [t["image_id"] for t in batch["targets"]] == ["s0", "s1"]
    # 60 x 40 rounds to 56 x 28 = 1568 < 3136 pixels: beta = sqrt(3136 / 2400) = 1.143,
    # ceil(60 * 1.143 / 28) = 3 -> 84, ceil(40 * 1.143 / 28) = 2 -> 56
    assert batch["images"][0].size == (84, 56)
    assert batch["inputs"]["image_sizes"].tolist() == [[84, 56], [84, 56]]
    # s1 has one box, in 0..1000: 30 / 60 -> 500, 20 / 40 -> 500
    assert batch["targets"][1]["boxes"].tolist() == [[0.0, 0.0, 500.0, 500.0]]
    assert batch["inputs"]["attention_mask"].shape[0] == 2
    short = DetectionCollate(FakeProcessor())(
        [
            {
                "messages": [{"content": [{"type": "text", "text": "a b"}]}],
                "image": batch["images"][0],
                "target": {},
            }
        ]
        + [
            {
                "messages": [{"content": [{"type": "text", "text": "a b c d"}]}],
                "image": batch["images"][0],
                "target": {},
            }
        ]
    )
    # left padding: the shorter prompt's padding is at the start of its row
    assert short["inputs"]["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_failed_batches_are_none_and_counted(tmp_path):
    good = _samples(tmp_path, 1)
    missing = [DetectionSample(f"m{i}", tmp_path / f"m{i}.jpg", 0, 0) for i in range(2)]
    dm = _module([good + missing], batch_size=2, shuffle_buffer=0, repeat_train=False)
    with pytest.warns(UserWarning, match="m1.jpg"):
        first, second = _delivered(dm, 2)
    assert [t["image_id"] for t in first["targets"]] == ["s0"]
    assert second is None
    assert dm.skipped == {"missing_image": 2}
    # a failed batch still counts towards the position: 2 batches, 3 samples
    assert dm.state_dict() == {
        "skipped": {"missing_image": 2},
        "train": {"epoch": 0, "prefix": 0, "consumed": [3], "batches": 2, "layout": [1, 1]},
    }
    with pytest.raises(ValueError, match="m0.jpg"):
        _delivered(_module([missing], strict=True), 1)
    with pytest.warns(
        UserWarning, match=r"^data: skipped over the run \(data/skipped_\*\): missing_image 2$"
    ):
        dm.teardown("fit")


def test_a_source_whose_images_never_load_stops_the_run(tmp_path):
    good = _samples(tmp_path, 1)
    missing = [DetectionSample(f"m{i}", tmp_path / f"m{i}.jpg", 0, 0) for i in range(3)]
    # repeated endlessly, three missing images fail again and again: the fourth failure stops it
    dm = _module([missing, good], batch_size=1, shuffle_buffer=0, max_failures_before_first=4)
    dm.streams["train"].names = ["lost", "fine"]
    with (
        pytest.warns(UserWarning),
        pytest.raises(InputError, match=r"^train source lost at .*: none of its first 4"),
    ):
        _delivered(dm, 40)
    assert dm.loaded[("train", "fine")] > 0  # the other source loads: it alone never stops the run


class Recorder(LightningModule):
    """Records the image ids of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append([t["image_id"] for t in batch["targets"]])
        return (self.w**2).sum()

    def validation_step(self, batch, batch_idx):
        raise AssertionError("no val sources: no validation")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm: DetectionDataModule, ckpt: Path | None = None, **trainer_args) -> Recorder:
    model = Recorder()
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_args,
    )
    trainer.fit(model, dm, ckpt_path=ckpt)
    model.trainer_ = trainer
    return model


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_through_lightning_continues_without_repeat_or_gap(tmp_path, workers):
    samples = _samples(tmp_path, 13)
    options = dict(batch_size=2, num_workers=workers, shuffle_buffer=4, seed=5)
    reference = _fit(_module([samples], **options), max_steps=8).seen
    first = _fit(_module([samples], **options), max_steps=3)
    first.trainer_.save_checkpoint(tmp_path / "step3.ckpt")
    resumed = _fit(_module([samples], **options), ckpt=tmp_path / "step3.ckpt", max_steps=8).seen
    assert first.seen + resumed == reference
    # 8 full batches from an endless repetition of 13 samples
    assert [len(ids) for ids in reference] == [2] * 8


def test_epochs_cover_every_sample_in_a_new_order(tmp_path):
    samples = _samples(tmp_path, 8)
    dm = _module([samples], batch_size=2, num_workers=2, shuffle_buffer=8, repeat_train=False)
    seen = _fit(dm, max_epochs=2).seen
    epochs = [[i for ids in seen[:4] for i in ids], [i for ids in seen[4:] for i in ids]]
    assert len(seen) == 8
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(s.image_id for s in samples)
    assert epochs[0] != epochs[1]


def test_yaml_with_class_path_sources(tmp_path):
    from jsonargparse import ArgumentParser

    _samples(tmp_path, 1)
    config = tmp_path / "data.yaml"
    config.write_text(
        f"""
data:
  train:
    - class_path: dip_r1.data.ImageFolder
      init_args: {{pattern: {tmp_path}}}
  train_weights: [2.0]
  prompt_builder:
    class_path: dip_r1.data.DetectionPromptBuilder
    init_args: {{coordinates: relative-1000, max_pixels: 50176}}
  batch_size: 4
"""
    )
    parser = ArgumentParser()
    parser.add_class_arguments(DetectionDataModule, "data")
    parser.add_argument("--config", action="config")
    assert "Relative sampling weight of each training source" in parser.format_help()
    dm = parser.instantiate(parser.parse_args(["--config", str(config)])).data
    assert isinstance(dm.prompt_builder, DetectionPromptBuilder)
    assert (dm.prompt_builder.coordinates, dm.batch_size) == ("relative-1000", 4)
    assert [s.image_id for s in dm.streams["train"].sources[0]] == ["img.png"]


def test_predict_images_without_annotation(tmp_path):
    for name in ("b", "a"):
        Image.new("RGB", (30, 30)).save(tmp_path / f"{name}.jpg")
    dm = DetectionDataModule(predict_images=str(tmp_path / "*.jpg"), batch_size=4)
    dm.connect(FakeProcessor())
    (batch,) = [dm.on_before_batch_transfer(b, 0) for b in dm.predict_dataloader()]
    assert [t["image_id"] for t in batch["targets"]] == ["a.jpg", "b.jpg"]
    assert batch["targets"][0]["boxes"].shape == (0, 4) and batch["targets"][0]["orig_size"] == (30, 30)
    with pytest.raises(ValueError, match="no train sources"):
        dm.train_dataloader()
    with pytest.raises(RuntimeError, match="connect"):
        DetectionDataModule(predict_images=str(tmp_path)).predict_dataloader()


def test_real_tiny_qwen2_vl_processor(tmp_path):
    pytest.importorskip("dip_r1.tiny")
    from dip_r1.models import load_processor
    from dip_r1.tiny import save_tiny

    processor = load_processor(save_tiny(tmp_path / "tiny", "qwen2_vl", "xs"))
    dm = DetectionDataModule(train=[_samples(tmp_path, 4, size=(300, 200))], batch_size=2, num_workers=2)
    dm.connect(processor, coordinates="relative-1000")
    (batch,) = _delivered(dm, 1)
    # 300 x 200 within the tiny processor's 28 * 28 * 64 pixels: 308 x 196 = 60368 is too many, so
    # beta = sqrt(60000 / 50176) = 1.0935: 300 / 1.0935 / 28 = 9.8 -> 252, 200 / 1.0935 / 28 = 6.5 -> 168
    assert batch["images"][0].size == (252, 168)
    # the processor kept that size: a grid of 168 / 14 x 252 / 14 patches, no second resize
    assert batch["inputs"]["image_grid_thw"].tolist() == [[1, 12, 18], [1, 12, 18]]
    ids = batch["inputs"]["input_ids"]
    assert processor.tokenizer.padding_side == "left" and ids.shape[0] == 2
    assert processor.tokenizer.decode(ids[0]).rstrip().endswith("<|im_start|>assistant")


@pytest.mark.parametrize("workers", [0, 2])
def test_reader_skips_reach_the_datamodule_once(tmp_path, workers):
    # A malformed annotation line is read by every worker, but counted once in the DataModule's skips.
    import json
    import warnings

    from dip_r1.data.sources import JSONLines

    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "boxes": [[1, 1, 20, 20]], "labels": ["person"]})
    (tmp_path / "data.jsonl").write_text("\n".join([good, "{not json", good, good, good]) + "\n")
    dm = _module(
        [JSONLines(tmp_path / "data.jsonl")],
        batch_size=2,
        shuffle_buffer=0,
        repeat_train=False,
        num_workers=workers,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert sum(len(b["targets"]) for b in batches) == 4
    assert dm.skipped == {"malformed_line": 1}
