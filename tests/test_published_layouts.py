"""The published checkpoint folders (``tests/fixtures/published``: every file but the weights, sizes shrunk in
``config.json`` only) load, prompt, train, validate and export as dip_r1 runs them.

Each folder keeps its own special tokens at their published ids (151643+, or 248044+ for Qwen3.5), its own pixel
limits, chat template and generation defaults; see tests/fixtures/published/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import (
    assert_each_eos_stops,
    logits,
    prompt_batch,
    rollout_settings,
    synthetic_crowd,
    train_and_save,
)
from published import FIXTURES, NAMES, published_checkpoint

from dip_r1 import export
from dip_r1.config import SamplingConfig
from dip_r1.data import DetectionDataModule
from dip_r1.data.images import open_rgb
from dip_r1.models import LoraSpec, PolicySpec, chat_template, load_policy, load_processor
from dip_r1.module import GRPOModule


@pytest.fixture(scope="module", params=NAMES)
def published(request, tmp_path_factory) -> Path:
    """One published layout with its tokenizer and random weights, written once per module."""
    return published_checkpoint(request.param, tmp_path_factory.mktemp("published") / request.param)


def _published_json(folder: Path, name: str) -> dict:
    return json.loads((FIXTURES / folder.name / name).read_text())


def test_load_policy_keeps_the_published_ids_limits_and_template(published):
    model, processor = load_policy(published)
    config = _published_json(published, "config.json")
    text = config.get("text_config", config)
    # the embedding has the published vocabulary, and every added token keeps its published id
    assert model.get_input_embeddings().weight.shape[0] == text["vocab_size"]
    decoder = _published_json(published, "tokenizer_config.json")["added_tokens_decoder"]
    tokens = [t["content"] for t in decoder.values()]
    assert processor.tokenizer.convert_tokens_to_ids(tokens) == [int(i) for i in decoder]
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]
    # the image processor's pixel limits are the published ones (nothing in dip_r1 narrows them)
    pre = _published_json(published, "preprocessor_config.json")
    size = pre.get("size", {"shortest_edge": pre.get("min_pixels"), "longest_edge": pre.get("max_pixels")})
    assert (processor.image_processor.size.shortest_edge, processor.image_processor.size.longest_edge) == (
        size["shortest_edge"],
        size["longest_edge"],
    )
    assert processor.chat_template == chat_template(FIXTURES / published.name)
    generation = _published_json(published, "generation_config.json")
    assert model.generation_config.eos_token_id == generation["eos_token_id"]


def test_the_prompt_is_what_the_published_template_renders(published, tmp_path):
    module = GRPOModule(PolicySpec(str(published)))
    module.configure_model()
    processor = module.processor
    source = synthetic_crowd(tmp_path, "crowd", 0, n=2)
    data = DetectionDataModule(val=[source], batch_size=2)
    data.connect(processor, **module.data_spec())
    batch = data.on_before_batch_transfer(next(iter(data.val_dataloader())), 0)
    samples = list(source)
    expected = [
        processor.apply_chat_template(
            data.prompt_builder.build(s, open_rgb(s.image_path)).messages,
            tokenize=False,
            add_generation_prompt=True,
        )
        for s in samples
    ]
    assert batch["prompts"] == expected
    ids = batch["inputs"]["input_ids"]
    tok = processor.tokenizer
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    for row, mask, grid in zip(ids, batch["inputs"]["attention_mask"], batch["inputs"]["image_grid_thw"]):
        row = row[mask.bool()]
        # ChatML at the published ids: a system turn first, the assistant's turn opened last
        assert row[0] == im_start and (row == im_end).sum() == 2
        generation_prompt = expected[0][expected[0].rindex("<|im_start|>") :]
        assert row[-len(tok(generation_prompt).input_ids) :].tolist() == tok(generation_prompt).input_ids
        # one image token per merged patch of the image at the published pixel limits
        image_tokens = (row == module.policy.config.image_token_id).sum()
        assert image_tokens == grid.prod() // 4


def test_a_grpo_step_takes_the_recipes_sampling_and_every_published_eos_stops(published, monkeypatch):
    L.seed_everything(0)
    module = GRPOModule(
        PolicySpec(str(published)),
        group_size=2,
        sampling=SamplingConfig(max_new_tokens=5, temperature=0.9, top_p=0.97),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
    )
    seen = rollout_settings(module, monkeypatch)
    generation = _published_json(published, "generation_config.json")
    assert (generation["temperature"], generation.get("top_p")) != (0.9, 0.97)
    assert [
        (kw["sampling"].temperature, kw["sampling"].top_p, kw["sampling"].max_new_tokens) for kw in seen
    ] == [(0.9, 0.97, 5)]
    assert list(module.token_ids.eos) == generation["eos_token_id"] and seen[0]["tokens"] == module.token_ids
    assert_each_eos_stops(module, prompt_batch(module.processor))


def test_validate_scores_boxes(published, tmp_path):
    L.seed_everything(0)
    module = GRPOModule(
        PolicySpec(str(published), lora=LoraSpec(r=4)),
        sampling=SamplingConfig(max_new_tokens=8),
    )
    data = DetectionDataModule(val=[synthetic_crowd(tmp_path, "crowd", 1, n=2)], batch_size=2)
    data.connect(module.processor, **module.data_spec())
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    (logged,) = trainer.validate(module, data, verbose=False)
    assert logged["val/crowd/images"] == 2
    assert {"val/crowd/ap", "val/crowd/f1", "val/crowd/format_valid"} <= set(logged)


def test_merged_export_reloads_with_the_trained_logits(published, tmp_path):
    from transformers import AutoModelForImageTextToText

    L.seed_everything(0)
    module = GRPOModule(
        PolicySpec(str(published), lora=LoraSpec(r=4, alpha=8)),
        group_size=2,
        sampling=SamplingConfig(max_new_tokens=3),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    batch = train_and_save(module, tmp_path / "last.ckpt")
    trained = logits(module.policy, batch["inputs"])
    out = export.main(["--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "merged"), "--merge"])
    # the published processor files travel with the model, as they were
    for f in (FIXTURES / published.name).iterdir():
        if f.name not in ("config.json", "generation_config.json"):
            assert (out / f.name).read_text() == f.read_text(), f.name
    model = AutoModelForImageTextToText.from_pretrained(out)
    torch.testing.assert_close(logits(model, batch["inputs"]), trained, atol=1e-5, rtol=0)
    assert torch.equal(prompt_batch(load_processor(out))["input_ids"], batch["inputs"]["input_ids"])
