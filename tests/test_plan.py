"""The memory planner (``dip-r1 plan``): exact parameter counts, the recipe read as ``fit`` reads it, one-line
errors, and advice that, once applied, fits."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from published import FIXTURES, NAMES
from test_recipes import GPU_RECIPES, parse  # noqa: F401  (parse: the fit parser, a fixture)

from dip_r1.architectures import PUBLISHED, published_config, resize
from dip_r1.plan import GIB, Shape, StepSettings, estimate, parameter_counts
from dip_r1.plan_recipe import checkpoint_config, main, read_recipe, settings_of

ROOT = Path(__file__).parents[1]
QLORA_3B = ROOT / "recipes" / "qwen2_5_vl_3b_crowdhuman_qlora.yaml"


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


CONFIGS = {f"fixture-{n}": _fixture(n) for n in NAMES} | {
    n: resize(_fixture(spec["fixture"]), n) for n, spec in PUBLISHED.items()
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_counts_are_transformers_own(name):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = CONFIGS[name]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**config))
    counts = parameter_counts(Shape.from_config(config))
    params = dict(model.named_parameters())
    vision = sum(p.numel() for n, p in params.items() if ".visual." in n)
    embedding = model.get_input_embeddings().weight.numel()
    assert counts["vision"] == vision
    assert counts["embedding"] == embedding
    assert sum(counts.values()) == sum(p.numel() for p in params.values())


def test_the_published_sizes_are_the_published_parameter_counts():
    billions = {n: sum(parameter_counts(Shape.from_config(c)).values()) / 1e9 for n, c in CONFIGS.items()}
    # the model cards' sizes (3.75 B for Qwen2.5-VL-3B, 8.29 B for the 7B, 8.77 B for Qwen3-VL-8B)
    assert round(billions["Qwen2.5-VL-3B-Instruct"], 2) == 3.75
    assert round(billions["Qwen2.5-VL-7B-Instruct"], 2) == 8.29
    assert round(billions["Qwen3-VL-8B-Instruct"], 2) == 8.77
    # a published config without token ids plans the same as the fixture resized to it
    for name in PUBLISHED:
        assert Shape.from_config(published_config(name)) == Shape.from_config(CONFIGS[name])


GRPO_RECIPES = [p for p in GPU_RECIPES if "GRPOModule" in p.read_text()]


def test_an_sft_recipe_is_declined_in_one_line():
    done = _plan("--config", str(ROOT / "recipes" / "qwen2_5_vl_3b_crowdhuman_sft.yaml"))
    assert done.returncode == 2 and done.stderr.startswith("dip-r1: error: ") and "GRPOModule" in done.stderr


@pytest.mark.parametrize("recipe", GRPO_RECIPES, ids=lambda p: p.name)
def test_the_planner_reads_what_fit_parses(recipe, parse, tmp_path):  # noqa: F811
    fit = parse(recipe)
    init, policy = fit.model.init_args, fit.model.init_args.policy
    config, _ = checkpoint_config(policy.path)
    shape = Shape.from_config(config)
    st = settings_of(read_recipe([str(recipe)], []), shape)
    sampling = getattr(init, "sampling", init)
    assert (st.quantization, st.dtype, st.gradient_checkpointing) == (
        policy.quantization,
        policy.dtype,
        policy.gradient_checkpointing,
    )
    assert st.lora_r == (policy.lora.r if policy.lora else None)
    assert (st.group_size, st.max_new_tokens, st.micro_batch_size) == (
        init.group_size,
        sampling.max_new_tokens,
        init.micro_batch_size,
    )
    assert st.share_prompt_prefix == init.share_prompt_prefix
    assert st.prompts == fit.data.batch_size and st.precision == str(fit.trainer.precision)
    assert st.image_tokens == fit.data.prompt_builder.init_args.max_pixels // shape.factor**2


def test_a_silent_recipe_gets_the_codes_defaults(parse, tmp_path):  # noqa: F811
    bare = tmp_path / "bare.yaml"
    bare.write_text(
        "model:\n  class_path: dip_r1.module.GRPOModule\n  init_args:\n    policy:\n"
        "      path: /models/Qwen2.5-VL-3B-Instruct\n"
    )
    fit = parse(bare)
    shape = Shape.from_config(published_config("Qwen2.5-VL-3B-Instruct"))
    st = settings_of(read_recipe([str(bare)], []), shape)
    init = fit.model.init_args
    sampling = getattr(init, "sampling", init)
    assert (st.group_size, st.max_new_tokens, st.micro_batch_size, st.prompts) == (
        init.group_size,
        sampling.max_new_tokens,
        init.micro_batch_size,
        fit.data.batch_size,
    )
    assert (st.quantization, st.lora_r, st.dtype, st.gradient_checkpointing) == (None, None, "float32", False)
    assert fit.trainer.precision is None and st.precision == "32-true"  # the Trainer's default


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dip_r1.cli", "plan", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def _total(stdout: str) -> float:
    return float(re.search(r"^peak = .*?\s([0-9.]+)\s+persistent", stdout, re.M).group(1))


def test_the_3b_qlora_recipe_fits_24gb_with_no_weights_on_disk():
    assert not Path("/models/Qwen2.5-VL-3B-Instruct/config.json").exists()
    done = _plan("--config", str(QLORA_3B), "--gpu-memory", "24GB")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "published Qwen2.5-VL-3B-Instruct sizes" in out and "fits in 24 GiB" in out
    for row in ("base weights", "adapters", "optimizer state", "rollout KV cache", "log-prob logits"):
        assert row in out
    assert "activations, no checkpointing (unused)" in out  # the recipe checkpoints


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "recipes/nowhere.yaml"], "no recipe at recipes/nowhere.yaml"),
        (
            ["--config", str(QLORA_3B), "--model.init_args.policy.path", "/x/Mystery"],
            "'Mystery' names no published",
        ),
        (["--config", str(QLORA_3B), "--gpu-memory", "lots"], "--gpu-memory 'lots'"),
    ],
)
def test_bad_input_is_one_line(args, message):
    done = _plan(*args)
    assert done.returncode == 2 and done.stdout == ""
    assert (
        done.stderr.count("\n") == 1 and done.stderr.startswith("dip-r1: error: ") and message in done.stderr
    )


def test_an_unknown_family_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    done = _plan("--config", str(QLORA_3B), "--model.init_args.policy.path", str(tmp_path))
    assert done.returncode == 2
    assert (
        done.stderr
        == "dip-r1: error: unknown model family 'llama': the planner knows qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5\n"
    )


def test_advice_once_applied_fits():
    over = ["--config", str(QLORA_3B), "--gpu-memory", "12GB", "--model.init_args.micro_batch_size", "16"]
    over += ["--model.init_args.policy.gradient_checkpointing", "false"]
    done = _plan(*over)
    assert done.returncode == 0 and "does not fit in 12 GiB" in done.stdout
    turns = re.findall(r"^  turn --(\S+) (\S+)\s+-> ([0-9.]+) GiB", done.stdout, re.M)
    assert turns and turns[0][0] == "model.init_args.policy.gradient_checkpointing"
    assert float(turns[-1][2]) <= 12
    applied = _plan(*over, *[x for key, value, _ in turns for x in (f"--{key}", value)])
    assert applied.returncode == 0 and "fits in 12 GiB" in applied.stdout
    assert _total(applied.stdout) == pytest.approx(float(turns[-1][2]), abs=0.01)


def test_the_components_scale_as_the_step_does():
    shape = Shape.from_config(published_config("Qwen2.5-VL-3B-Instruct"))
    base = StepSettings(
        quantization="4bit", lora_r=16, dtype="bfloat16", precision="bf16-mixed", image_tokens=256
    )
    one = estimate(shape, base).components
    two = estimate(
        shape, StepSettings(**{f.name: getattr(base, f.name) for f in fields(base)} | {"prompts": 4})
    ).components
    # the KV cache is linear in the rollouts; the weights do not change
    assert two["kv_cache"] == pytest.approx(2 * one["kv_cache"])
    assert two["base_weights"] == one["base_weights"]
    # NF4: 3.75 B parameters of which 2.77 B quantised: about 3.2 GiB with the bf16 rest, 7 GiB in bf16
    bf16 = estimate(shape, StepSettings(lora_r=16, dtype="bfloat16")).components["base_weights"]
    assert bf16 == 2 * sum(parameter_counts(shape).values())
    assert 3.0 * GIB < one["base_weights"] < 3.3 * GIB


def test_main_in_process_prints_the_table(capsys):
    assert main(["--config", str(QLORA_3B)]) == 0
    assert "fits in 24 GiB" in capsys.readouterr().out
