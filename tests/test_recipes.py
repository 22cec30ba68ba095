"""Every recipe parses against the code with the CLI's own parser (``dip-r1 fit --config``), without building a
model: a key the code does not know, a wrong type or a class_path that does not import fails here, not on a GPU
hours later. An evaluation recipe (``recipes/eval/<dataset>.yaml``) is an overlay on ``recipes/eval/base.yaml``
and is parsed as it is run, after its base (``dip-r1 validate --config base --config overlay``)."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml

from dip_r1 import cli

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
GPU_RECIPES = [p for p in RECIPES if p.name.startswith("qwen")]
EVAL_BASE = Path(__file__).parents[1] / "recipes" / "eval" / "base.yaml"
EVAL_RECIPES = sorted(p for p in EVAL_BASE.parent.glob("*.yaml") if p != EVAL_BASE)


@pytest.fixture
def parse(monkeypatch):
    """``dip-r1 fit --config PATH`` (or another subcommand) up to the parsed config: the real CLI (``cli.main``,
    its parser and defaults) with class instantiation and the subcommand switched off. Returns the
    subcommand's namespace."""
    monkeypatch.setattr(cli.DipR1CLI, "instantiate_classes", lambda self: None)
    monkeypatch.setattr(cli.DipR1CLI, "_run_subcommand", lambda self, subcommand: None)
    monkeypatch.setattr(sys, "argv", ["dip-r1"])  # pytest's own arguments are not the CLI's

    def run(path: Path, *extra: str, subcommand: str = "fit"):
        return cli.main([subcommand, "--config", str(path), *extra]).config[subcommand]

    return run


def _class_paths(node) -> list[str]:
    """Every ``class_path`` in a YAML tree, and the classes FSDP's auto_wrap_policy lists."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "class_path":
                found.append(value)
            elif key == "auto_wrap_policy":
                found.extend(value)
            else:
                found.extend(_class_paths(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_class_paths(value))
    return found


def test_the_recipes_are_there():
    names = {p.name for p in RECIPES}
    assert {
        "quickstart.yaml",
        "qwen2_5_vl_3b_crowdhuman_qlora.yaml",
        "qwen2_5_vl_3b_crowdhuman_sft.yaml",
        "qwen2_5_vl_7b_crowdhuman_lora_ddp.yaml",
        "qwen2_5_vl_7b_crowdhuman_fsdp.yaml",
        "qwen3_vl_2b_crowdhuman_qlora.yaml",
        "qwen3_5_4b_crowdhuman_qlora.yaml",
    } <= names


@pytest.mark.parametrize("path", [*RECIPES, EVAL_BASE, *EVAL_RECIPES], ids=lambda p: p.stem)
def test_every_class_path_imports(path):
    paths = _class_paths(yaml.safe_load(path.read_text()))
    assert paths
    for class_path in paths:
        module, name = class_path.rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), name), type), class_path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_against_the_code(parse, path):
    config = parse(path)
    assert config.model.class_path in ("dip_r1.module.GRPOModule", "dip_r1.sft.SFTModule")
    assert config.model.init_args.policy.path
    assert config.data.train, "a recipe trains on something"


@pytest.mark.parametrize("path", EVAL_RECIPES, ids=lambda p: p.stem)
def test_evaluation_recipe_parses_after_its_base(parse, path):
    config = parse(EVAL_BASE, "--config", str(path), subcommand="validate")
    assert config.model.class_path == "dip_r1.module.GRPOModule"
    assert config.model.init_args.policy.path == "/models/Qwen2.5-VL-3B-Instruct"  # from the base
    assert config.data.val and config.data.test, "an evaluation recipe evaluates on something"
    assert config.data.val == config.data.test
    assert config.trainer.logger.init_args.name == f"eval_{path.stem}"  # its own log folder
    assert config.data.prompt_builder.init_args.max_pixels == 401408  # the base's, kept beside the overlay's
    header = re.match(r"(#[^\n]*\n)+", path.read_text()).group(0)
    assert f"dip-r1 validate --config recipes/eval/base.yaml --config recipes/eval/{path.name}" in header


def test_gpu_recipes_hold_what_they_promise(parse):
    by_name = {p.name.removeprefix("qwen2_5_vl_").removesuffix(".yaml"): parse(p) for p in GPU_RECIPES}
    qlora, sft = by_name["3b_crowdhuman_qlora"], by_name["3b_crowdhuman_sft"]
    ddp, fsdp = by_name["7b_crowdhuman_lora_ddp"], by_name["7b_crowdhuman_fsdp"]
    q = qlora.model.init_args
    assert (q.policy.quantization, q.policy.lora.r, q.policy.gradient_checkpointing) == ("4bit", 16, True)
    assert q.group_size == 8 and q.optimizer.class_path.startswith("bitsandbytes.optim.")
    assert qlora.trainer.devices == 1 and qlora.trainer.precision.startswith("bf16")
    assert sft.model.class_path == "dip_r1.sft.SFTModule"
    assert sft.model.init_args.policy == q.policy  # the baseline differs from GRPO in the objective only
    assert ddp.trainer.strategy == "ddp" and ddp.model.init_args.policy.lora is not None
    strategy = fsdp.trainer.strategy
    assert strategy.class_path == "lightning.pytorch.strategies.FSDPStrategy"
    assert {c.__name__ for c in strategy.init_args.auto_wrap_policy} == {
        "Qwen2_5_VLDecoderLayer",
        "Qwen2_5_VLVisionBlock",
    }
    assert strategy.init_args.state_dict_type == "full"  # one file: what dip_r1.export reads
    assert fsdp.model.init_args.policy.lora is None  # full fine-tuning
    for config in (qlora, sft, ddp, fsdp):
        source = config.data.train[0]
        assert source.class_path == "dip_r1.data.sources.CrowdHuman"
        assert source.init_args.annotation_file.startswith("/path/to/CrowdHuman/")
        assert config.model.init_args.policy.path.startswith("/models/Qwen2.5-VL-")


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_header_names_the_fields_a_user_edits(path):
    header = re.match(r"(#[^\n]*\n)+", path.read_text()).group(0)
    assert f"dip-r1 fit --config recipes/{path.name}" in header
    for field in ("policy.path", "annotation_file", "image_dir", "Hardware"):
        assert field in header, field


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        ("    group_size: 8\n", "    group_sise: 8\n"),  # the module's own argument
        ("      quantization: 4bit\n", "      quantisation: 4bit\n"),  # inside the PolicySpec dataclass
        (
            "        image_dir: /path/to/CrowdHuman/Images\n",
            "        image_dirs: /path/to/CrowdHuman/Images\n",
        ),
        ("  precision: bf16-mixed\n", "  precission: bf16-mixed\n"),  # the Trainer's
        ("      quantization: 4bit\n", "      quantization: 3bit\n"),  # a value outside the Literal
    ],
    ids=["model", "policy", "data-source", "trainer", "value"],
)
def test_a_misspelled_key_fails(parse, tmp_path, capsys, good, bad):
    text = GPU_RECIPES[0].read_text()
    assert text.count(good) == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace(good, bad))
    with pytest.raises(SystemExit):
        parse(broken)
    assert bad.split(":")[0].strip() in capsys.readouterr().err


def test_command_line_overrides_reach_the_config(parse):
    config = parse(GPU_RECIPES[0], "--model.init_args.policy.path", "/elsewhere", "--trainer.max_steps", "3")
    assert config.model.init_args.policy.path == "/elsewhere" and config.trainer.max_steps == 3
