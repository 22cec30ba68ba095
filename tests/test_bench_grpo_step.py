"""bench/grpo_step.py runs end to end and reports the vision encoder once per prompt."""

from __future__ import annotations

from helpers import load_bench


def test_grpo_step_bench_prints_its_keys(tiny_qwen2_vl, capsys):
    bench = load_bench("grpo_step")
    argv = ["--model", tiny_qwen2_vl, "--prompts", "2", "--group", "3", "--max-new-tokens", "4"]
    import torch

    try:
        bench.main([*argv, "--steps", "1", "--warmup", "0", "--fixed-length", "--image-size", "56"])
    finally:  # the bench flushes subnormal floats process-wide; the rest of the suite must not inherit it
        torch.set_flush_denormal(False)
    import json

    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # one JSON line
    for key in ("step_s", "tokens_per_s", "peak_rss_mb", "vision_calls_per_step"):
        assert result[key] > 0, key
    # 2 prompts: 2 images encoded in the whole step (not 2 x 3), none again when the completions are scored
    assert result["vision_calls_per_step"] == 2
    assert result["vision_calls_scoring_per_step"] == 0
    assert result["tokens_per_step"] == 2 * 3 * 4  # --fixed-length: every completion exactly T tokens
    assert result["rollouts_per_step"] == 1


def test_grpo_step_bench_with_dynamic_sampling_draws_more_batches(tiny_qwen2_vl, capsys):
    bench = load_bench("grpo_step")
    argv = [
        "--model",
        tiny_qwen2_vl,
        "--prompts",
        "2",
        "--group",
        "3",
        "--max-new-tokens",
        "4",
        "--steps",
        "1",
    ]
    import torch

    try:  # half the groups flat: each step rolls out its batch and one more to fill its 2 groups
        bench.main(
            [*argv, "--warmup", "0", "--image-size", "56", "--flat-share", "0.5", "--dynamic-sampling"]
        )
    finally:
        torch.set_flush_denormal(False)
    import json

    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rollouts_per_step"] == 2
    assert result["vision_calls_rollout_per_step"] == 4


def test_benchmark_model_sizes():
    # the memory benchmark's subject is ~100 M parameters, and the GPU shape is Qwen2.5-VL-3B's 3.75 B
    # (counted on the meta device: nothing is allocated)
    import torch
    from transformers import AutoModelForImageTextToText

    from dip_r1.tiny import build_config, build_tokenizer

    _common = load_bench("_common")
    tokenizer = build_tokenizer(2048)
    with torch.device("meta"):
        m = AutoModelForImageTextToText.from_config(build_config("qwen2_vl", "m", tokenizer))
        big = AutoModelForImageTextToText.from_config(_common.shape_config("qwen2_5_vl_3b", tokenizer))
    assert 95e6 < sum(p.numel() for p in m.parameters()) < 115e6
    assert 3.70e9 < sum(p.numel() for p in big.parameters()) < 3.80e9
    assert big.config.text_config.num_hidden_layers == 36 and big.config.vision_config.depth == 32
