"""A checkpoint folder's own files, laid out as the published Qwen folders: ``chat_template.json`` instead of
``chat_template.jinja``, a ``generation_config.json`` with several EOS ids and near-greedy sampling defaults."""

from __future__ import annotations

import json
import shutil

import torch
from helpers import assert_each_eos_stops, prompt_batch, rollout_settings

from dip_r1.config import SamplingConfig
from dip_r1.models import PolicySpec, load_processor, processor_class
from dip_r1.module import GRPOModule
from dip_r1.tiny import CHAT_TEMPLATE


def _published_layout(tiny, tmp_path):
    """The tiny Qwen2.5-VL with the published folders' file kinds: the template as chat_template.json, and the
    generation defaults of Qwen2.5-VL-3B-Instruct's generation_config.json (two EOS ids, <|im_end|> and
    <|endoftext|>; sampling near greedy), at the tiny tokenizer's ids."""
    folder = tmp_path / "published"
    shutil.copytree(tiny, folder)
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    tok = load_processor(tiny).tokenizer
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    generation = json.loads((folder / "generation_config.json").read_text())
    generation.update(
        eos_token_id=[im_end, endoftext],
        do_sample=True,
        temperature=0.1,
        top_p=0.001,
        top_k=1,
        max_new_tokens=2,
    )
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder, [im_end, endoftext]


def test_chat_template_json_folder_renders_its_template(tiny_qwen2_5_vl, tmp_path):
    folder, _ = _published_layout(tiny_qwen2_5_vl, tmp_path)
    processor = load_processor(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Detect"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith(
        "<|vision_start|><|image_pad|><|vision_end|>Detect<|im_end|>\n<|im_start|>assistant\n"
    )
    ref = prompt_batch(load_processor(tiny_qwen2_5_vl))
    assert torch.equal(prompt_batch(processor)["input_ids"], ref["input_ids"])


def test_recipe_sampling_wins_and_every_eos_id_stops(tiny_qwen2_5_vl, tmp_path, monkeypatch):
    folder, eos = _published_layout(tiny_qwen2_5_vl, tmp_path)
    module = GRPOModule(
        PolicySpec(str(folder)),
        group_size=2,
        sampling=SamplingConfig(max_new_tokens=6, temperature=0.9, top_p=0.95),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
    )
    module.configure_model()
    assert list(module.token_ids.eos) == eos
    seen = rollout_settings(module, monkeypatch)
    # the rollout's settings are the recipe's, never the checkpoint's generation defaults
    assert [
        (kw["sampling"].temperature, kw["sampling"].top_p, kw["sampling"].max_new_tokens) for kw in seen
    ] == [(0.9, 0.95, 6)]
    assert list(seen[0]["tokens"].eos) == eos
    # the second EOS id (<|endoftext|>) ends a completion as the first does
    assert_each_eos_stops(module, prompt_batch(module.processor))


def test_processor_class_is_read_where_published_folders_name_it(tmp_path):
    # transformers writes processor_config.json; the published Qwen folders name the class in
    # preprocessor_config.json (and some in tokenizer_config.json) only; a folder naming none gets the class
    # transformers maps its model_type to
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    assert processor_class(tmp_path) == "Qwen3VLProcessor"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    assert processor_class(tmp_path) == "Qwen2VLProcessor"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    assert processor_class(tmp_path) == "Qwen2_5_VLProcessor"
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}))
    assert processor_class(tmp_path) == "Qwen3VLProcessor"


def test_an_image_processor_type_transformers_lacks_falls_back_to_the_familys(tiny_qwen2_5_vl, tmp_path):
    # the published Qwen2.5-VL folders name Qwen2_5_VLImageProcessor, a class no transformers release has
    folder = tmp_path / "published"
    shutil.copytree(tiny_qwen2_5_vl, folder)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(
        json.dumps({**pre, "image_processor_type": "Qwen2_5_VLImageProcessor"})
    )
    processor = load_processor(folder)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert (
        processor.image_processor.size.longest_edge
        == load_processor(tiny_qwen2_5_vl).image_processor.size.longest_edge
    )
