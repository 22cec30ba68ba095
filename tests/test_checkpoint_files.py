"""A checkpoint folder's own files, laid out as the published Qwen folders: ``chat_template.json`` instead of
``chat_template.jinja``, a ``generation_config.json`` with several EOS ids and near-greedy sampling defaults."""

from __future__ import annotations

import json
import shutil

import lightning as L
import torch
from helpers import Repeat, prompt_batch, toy_targets

import dip_r1.module
from dip_r1.models import PolicySpec, load_processor
from dip_r1.module import GRPOModule
from dip_r1.rollout import sample_completions
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
        max_new_tokens=6,
        temperature=0.9,
        top_p=0.95,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
    )
    module.configure_model()
    assert module.eos_ids == eos
    seen: list[dict] = []

    def spy(model, inputs, **kw):
        seen.append(kw)
        return sample_completions(model, inputs, **kw)

    monkeypatch.setattr(dip_r1.module, "sample_completions", spy)
    batch = {"inputs": prompt_batch(module.processor), "targets": toy_targets(2)}
    L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, torch.utils.data.DataLoader(Repeat(batch), batch_size=None))
    # the rollout's settings are the recipe's, never the checkpoint's generation defaults
    assert [(kw["temperature"], kw["top_p"], kw["max_new_tokens"]) for kw in seen] == [(0.9, 0.95, 6)]
    assert seen[0]["eos_token_id"] == eos
    # the second EOS id (<|endoftext|>) ends a completion as the first does: only it may be sampled here
    vocab = module.policy.config.text_config.vocab_size
    rollout = sample_completions(
        module.policy,
        batch["inputs"],
        group_size=2,
        max_new_tokens=6,
        eos_token_id=module.eos_ids,
        pad_token_id=module.pad_id,
        suppress_token_ids=[i for i in range(vocab) if i != eos[1]],
    )
    assert rollout.lengths.tolist() == [1, 1, 1, 1] and not rollout.truncated.any()
