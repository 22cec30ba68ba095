"""The multi-GPU recipes' strategies, as their YAML writes them, on 2 CPU processes (gloo) with a tiny model: two
steps and a checkpoint, then a resume whose third step lands on the same weights as three uninterrupted steps."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import yaml
from fault_tools import fit, fit_config, write_config

RECIPES = Path(__file__).parents[1] / "recipes"


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _policy_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("policy.")}


def _strategy(recipe: str):
    return yaml.safe_load((RECIPES / recipe).read_text())["trainer"]["strategy"]


def test_lightning_runs_fsdp_on_gpus_only(tmp_path, tiny_qwen2_5_vl):
    """Lightning 2.6 refuses FSDP without CUDA (its accelerator_connector), before anything is built: the FSDP
    recipe waits for a GPU. If this starts to fail, Lightning runs FSDP on CPUs: add the FSDP recipe to the
    resume test below (full fine-tuning: ``policy: {path: ...}``, no LoRA)."""
    config = fit_config(tmp_path / "run", tiny_qwen2_5_vl, tmp_path / "crowd")
    config["trainer"].update(strategy=_strategy("qwen2_5_vl_7b_crowdhuman_fsdp.yaml"), devices=2)
    config["model"]["init_args"]["policy"] = {"path": tiny_qwen2_5_vl}
    done = fit(write_config(tmp_path / "fsdp.yaml", config), timeout=300)
    assert done.returncode != 0
    assert "The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`" in done.stderr


def test_the_ddp_recipes_strategy_resumes_exactly_on_two_cpu_processes(
    tmp_path, tiny_qwen2_5_vl, monkeypatch
):
    strategy = _strategy("qwen2_5_vl_7b_crowdhuman_lora_ddp.yaml")
    runs = {}
    for name, steps in (("straight", [3]), ("resumed", [2, 3])):
        monkeypatch.setenv("MASTER_PORT", _free_port())
        run = tmp_path / name
        config = fit_config(run, tiny_qwen2_5_vl, tmp_path / "crowd", n_images=16)
        config["trainer"].update(strategy=strategy, devices=2, max_steps=steps[0])
        path = write_config(tmp_path / f"{name}.yaml", config)
        done = fit(path, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        for more in steps[1:]:
            done = fit(path, "--ckpt_path", "last", "--trainer.max_steps", str(more), timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
        last = run / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=True)["global_step"] == 3
        runs[name] = _policy_weights(last)
    straight, resumed = runs["straight"], runs["resumed"]
    assert straight and straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
