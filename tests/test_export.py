"""dip_r1.export: a trained checkpoint becomes an adapter or a merged model that transformers reloads with the
trained policy's exact logits."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import logits, prompt_batch, train_and_save

from dip_r1 import export
from dip_r1.config import SamplingConfig
from dip_r1.models import LoraSpec, PolicySpec, load_policy, load_processor
from dip_r1.module import GRPOModule
from dip_r1.sft import SFTModule


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    """A GRPO LoRA checkpoint of a tiny model (each family), its input batch and the trained policy's logits."""
    L.seed_everything(0)
    module = GRPOModule(
        PolicySpec(tiny_model, lora=LoraSpec(r=4, alpha=8)),
        group_size=2,
        sampling=SamplingConfig(max_new_tokens=4),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    ckpt = tmp_path_factory.mktemp("lora") / "last.ckpt"
    batch = train_and_save(module, ckpt)
    return ckpt, batch["inputs"], logits(module.policy, batch["inputs"])


def test_lora_checkpoint_holds_only_adapters_and_its_spec(lora_run, tiny_model):
    ckpt, _, _ = lora_run
    checkpoint = export.load_checkpoint(ckpt)
    keys = list(checkpoint["state_dict"])
    # exactly the adapters of the policy: on Qwen2-VL 2 layers x 7 linear layers (q, k, v, o, gate, up, down) x
    # (A, B); Qwen3.5's linear-attention layers have their own projections
    fresh, _ = load_policy(tiny_model, lora=LoraSpec(r=4, alpha=8))
    assert keys == ["policy." + n for n, p in fresh.named_parameters() if p.requires_grad]
    assert len(keys) >= 28 and all(".lora_" in k for k in keys)
    spec = export.policy_spec_of(checkpoint)
    assert spec.lora == LoraSpec(r=4, alpha=8)


def test_adapter_export_reloads_with_peft_and_transformers(lora_run, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    ckpt, inputs, trained = lora_run
    out = export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "adapter")])
    names = {f.name for f in out.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
    } <= names
    assert {"preprocessor_config.json", "processor_config.json"} <= names
    assert "config.json" not in names and "model.safetensors" not in names
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    base = AutoModelForImageTextToText.from_pretrained(tiny_model)
    base_logits = logits(base, inputs)
    assert (base_logits - trained).abs().max() > 1e-3  # the adapter changes the output: the check can fail
    peft_model = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(logits(peft_model, inputs), trained, atol=1e-5, rtol=0)
    # transformers' own peft integration: the folder alone names its base (an absolute path)
    direct = AutoModelForImageTextToText.from_pretrained(out)
    torch.testing.assert_close(logits(direct, inputs), trained, atol=1e-5, rtol=0)
    reloaded = prompt_batch(load_processor(out))
    assert all(torch.equal(reloaded[k], inputs[k]) for k in inputs)


def test_merged_export_is_a_plain_model_with_the_trained_logits(lora_run, tmp_path):
    from transformers import AutoModelForImageTextToText

    ckpt, inputs, trained = lora_run
    out = export.export(ckpt, tmp_path / "merged", merge=True)
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    assert "adapter_config.json" not in names
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, inputs), trained, atol=1e-5, rtol=0)
    assert torch.equal(prompt_batch(load_processor(out))["input_ids"], inputs["input_ids"])


def test_full_finetuning_sft_checkpoint_exports_a_full_model(tiny_qwen2_5_vl, tmp_path):
    from transformers import AutoModelForImageTextToText

    L.seed_everything(0)
    module = SFTModule(PolicySpec(tiny_qwen2_5_vl), optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    batch = train_and_save(module, tmp_path / "sft.ckpt")
    trained = logits(module.policy, batch["inputs"])
    # SFTModule records no PolicySpec: the base comes from --model (no LoRA weights, so none is needed)
    out = export.main(
        ["--ckpt", str(tmp_path / "sft.ckpt"), "--out", str(tmp_path / "full"), "--model", tiny_qwen2_5_vl]
    )
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    model = AutoModelForImageTextToText.from_pretrained(out)
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_5_vl)
    assert (logits(base, batch["inputs"]) - trained).abs().max() > 1e-3
    torch.testing.assert_close(logits(model, batch["inputs"]), trained, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- spec lookup, no models
LORA = {
    "r": 8,
    "alpha": 16,
    "dropout": 0.0,
    "target_modules": None,
    "train_vision": False,
    "modules_to_save": [],
}
CLI_POLICY = {
    "path": "/models/base",
    "quantization": "4bit",
    "lora": LORA,
    "dtype": "bfloat16",
    "gradient_checkpointing": True,
    "freeze_vision": True,
}
EXPECTED = PolicySpec("/models/base", "4bit", LoraSpec(r=8, alpha=16, dropout=0.0), "bfloat16", True, True)


@pytest.mark.parametrize(
    "policy",
    [
        CLI_POLICY,  # what save_hyperparameters records under the CLI (its parsed config)
        Namespace(**CLI_POLICY),
        EXPECTED,  # a module built in Python
        {"class_path": "dip_r1.models.PolicySpec", "init_args": CLI_POLICY},
    ],
)
def test_policy_spec_of_reads_every_recorded_form(policy):
    assert export.policy_spec_of({"hyper_parameters": {"policy": policy}}) == EXPECTED


def test_policy_spec_of_fallbacks_and_override(tmp_path):
    # --model replaces the path and keeps the LoRA settings
    spec = export.policy_spec_of({"hyper_parameters": {"policy": CLI_POLICY}}, model="/elsewhere")
    assert spec.path == "/elsewhere" and spec.lora == EXPECTED.lora
    # a recorded base folder replaces a relative path that does not resolve here
    recorded = {"hyper_parameters": {"policy": {"path": "runs/gone"}}, "dip_r1": {"model": "/abs/base"}}
    assert export.policy_spec_of(recorded).path == "/abs/base"
    assert export.policy_spec_of({"dip_r1": {"policy": CLI_POLICY}}) == EXPECTED
    assert export.policy_spec_of({"dip_r1": {"model": "/abs/base"}}) == PolicySpec("/abs/base")
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  class_path: dip_r1.sft.SFTModule\n  init_args:\n    policy:\n      path: /models/base\n"
        "      lora: {r: 8, alpha: 16, dropout: 0.0}\n"
    )
    assert export.policy_spec_of({}, config=config).lora == EXPECTED.lora
    with pytest.raises(ValueError, match="--model"):
        export.policy_spec_of({"state_dict": {}})
    with pytest.raises(TypeError):  # a key PolicySpec does not know: another version's checkpoint
        export.policy_spec_of({"hyper_parameters": {"policy": {**CLI_POLICY, "rank": 3}}})


def test_a_relative_base_path_is_found_from_any_working_folder(tmp_path, monkeypatch):
    # an older checkpoint records only the path its run was given, relative to the folder the run started in
    (tmp_path / "repo/data/base").mkdir(parents=True)
    ckpt = tmp_path / "repo/runs/x/checkpoints/last.ckpt"
    ckpt.parent.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert export.find_base("data/base", ckpt) == tmp_path / "repo/data/base"
    assert export.find_base("data/gone", ckpt) == Path("data/gone")  # left to the model folder's check
    monkeypatch.chdir(tmp_path / "repo")
    assert export.find_base("data/base", ckpt) == Path("data/base")


def test_lora_weights_without_lora_settings_fail_before_loading_anything():
    checkpoint = {"state_dict": {"policy.base_model.model.x.q_proj.lora_A.default.weight": torch.zeros(1)}}
    with pytest.raises(ValueError, match="--config"):
        export.restore_policy(checkpoint, PolicySpec("/does/not/exist"))


def test_sharded_checkpoint_folder_is_refused_with_the_consolidation_command(tmp_path):
    with pytest.raises(ValueError, match="sharded .*consolidate_checkpoint"):
        export.load_checkpoint(tmp_path)


def test_processor_files_leave_the_base_records_and_weights_behind(tmp_path):
    from dip_r1.export import copy_processor_files

    base = tmp_path / "base"
    base.mkdir()
    for name in (
        "tokenizer.json",
        "chat_template.jinja",
        "config.json",
        "model.safetensors",
        "README.md",
        "scores.json",
    ):
        (base / name).write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    assert copy_processor_files(base, out) == ["chat_template.jinja", "tokenizer.json"]
