"""What the full-size runs (``bench/real_size.py``, ``bench/gpu_check.py``) stand on: the live-bytes counter, the
random checkpoints written shard by shard, QLoRA keeping its frozen weights at the load dtype, and the GPU check's
CPU pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _live import LiveBytes, model_bytes, storage_bytes  # noqa: E402


def test_live_bytes_counts_storages_from_creation_to_release():
    with LiveBytes() as live:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        b = a.view(10, 100)  # a view: no new storage
        c = torch.ones(500)  # 2000
        live.phase = "rollout"
        del a, b  # the storage goes with its last view
        d = torch.zeros(250, dtype=torch.float64)  # 2000
    assert live.peaks == {"loss": 6000, "rollout": 4000}
    assert live.live == 4000
    del c, d
    assert live.live == 0


def test_live_bytes_sees_what_autograd_keeps_for_the_backward():
    x = torch.randn(256, requires_grad=True)
    with LiveBytes() as live:
        y = x.exp()  # exp keeps its output for the backward
        z = y.sum()
        del y
        kept = live.live
        z.backward()
        del z
    assert kept >= 256 * 4  # the output, alive through the graph alone
    assert live.live <= 256 * 4  # after the backward: x.grad only


def test_model_bytes_by_kind():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    model(torch.randn(3, 4)).sum().backward()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    opt.step()
    out = model_bytes(model, opt)
    assert out["base_weights"] == (4 * 8 + 8) * 4
    assert out["adapters"] == out["gradients"] == (8 * 2 + 2) * 4
    assert out["optimizer_state"] == 2 * (8 * 2 + 2) * 4 + 2 * 4  # two moments and a step count a tensor
    assert storage_bytes([model[0].weight, model[0].weight[:2]]) == 4 * 8 * 4


def test_random_weights_are_written_shard_by_shard_and_load(tmp_path, monkeypatch):
    import real_size
    from transformers import AutoModelForImageTextToText

    sys.path.insert(0, str(ROOT / "tests"))
    from published import FIXTURES

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text((FIXTURES / "Qwen2.5-VL-3B-Instruct" / "config.json").read_text())
    monkeypatch.setattr(real_size, "SHARD_BYTES", 2_000_000)  # several shards of a 5 M-parameter model
    count = real_size.write_random_weights(folder, seed=0)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((folder / s).is_file() for s in shards)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == count
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(bool((p == 1).all()) for p in norms)
    assert 0.015 < float(model.get_input_embeddings().weight.float().std()) < 0.025


def test_qlora_keeps_the_frozen_weights_in_the_load_dtype(tiny_qwen2_5_vl):
    pytest.importorskip("bitsandbytes")
    from dip_r1.models import LoraSpec, load_policy

    model, _ = load_policy(tiny_qwen2_5_vl, quantization="4bit", lora=LoraSpec(r=4), dtype="bfloat16")
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    unquantised = {n: p for n, p in frozen.items() if type(p).__name__ != "Params4bit"}
    # peft's prepare_model_for_kbit_training would have made these float32: the embeddings and the vision tower
    assert any("embed_tokens" in n for n in unquantised) and any("visual" in n for n in unquantised)
    assert {p.dtype for p in unquantised.values()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # the adapters


def test_gpu_check_on_the_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    quick, step = out["quickstart"], out["qlora_3b_compile_off"]
    assert quick["steps"] == 2 and 0.0 <= quick["reward_last5"] <= 1.0 and quick["step_s_median"] > 0
    assert step["vision_calls_per_step"] == 1  # one prompt: the encoder ran once, the scoring reused it
    assert step["tokens_per_step"] == 8 and len(step["step_s"]) == 2
    live, planned = step["live_mib"], step["planner_mib"]
    # the weights, adapters and their gradients are counted, not estimated: the planner's equal them
    for kind in ("base_weights", "adapters", "gradients"):
        assert planned[kind] == pytest.approx(live[kind], rel=0.05, abs=0.05)
    assert live["kv_cache"] > 0 and live["loss_peak"] > 0
