"""The checks a GPU is needed for, as one command; prints one JSON line (and writes it to ``--out``).

    python bench/gpu_check.py                        # on one GPU: at most ~8 minutes
    python bench/gpu_check.py --device cpu --tiny    # what a CPU can check of it (the test suite runs this)

1. ``quickstart``: ``dip-r1 fit --config recipes/quickstart.yaml`` for 20 steps on CUDA in ``bf16-mixed``: the
   mean reward of the last five steps and the step time.
2. ``qlora_3b``: the step of ``recipes/qwen2_5_vl_3b_crowdhuman_qlora.yaml`` at its own settings (B 2, G 8,
   T 1024, every completion 1024 tokens; a 616 x 616 image, 484 image tokens: the recipe allows 512) on
   Qwen2.5-VL-3B-Instruct at its published size with random weights (``bench/real_size.py`` builds it):
   ``torch.cuda.max_memory_allocated``, step time, rollout tokens/s, with ``rollout_compile`` off and on, and
   the memory planner's estimate of the same step beside it.

``--tiny``: the same code paths on the shrunk published layout (``tests/fixtures/published``) instead of the
full-size model, B 1, G 2, T 4, a 112-pixel image, two quickstart steps of 16 tokens; ``rollout_compile`` on
only on CUDA (compiling on a CPU takes minutes). Every part runs even when one fails: its entry holds the
error, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import lightning as L
import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QLORA_3B = ROOT / "recipes" / "qwen2_5_vl_3b_crowdhuman_qlora.yaml"


class StepTimer(L.Callback):
    """Keeps each step's time and reward (class attributes); named in the recipe by ``class_path``."""

    times: list[float] = []
    rewards: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        type(self).times.append(time.perf_counter() - self.start)
        type(self).rewards.append(float(trainer.callback_metrics.get("train/reward", math.nan)))


def quickstart(device: str, steps: int, tmp: Path, max_new_tokens: int | None = None) -> dict:
    """``dip-r1 fit`` on the quickstart recipe for ``steps`` steps (no validation, no checkpoints)."""
    from dip_r1.cli import main

    config = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=steps, val_check_interval=None, limit_val_batches=0, enable_checkpointing=False)
    trainer.update(accelerator="gpu" if device == "cuda" else "cpu", devices=1)
    trainer.update(enable_progress_bar=False, enable_model_summary=False)  # stdout carries the JSON
    if device == "cuda":
        trainer["precision"] = "bf16-mixed"
    trainer["logger"]["init_args"]["save_dir"] = str(tmp / "runs")
    trainer["callbacks"] = [{"class_path": "gpu_check.StepTimer"}]  # this module, by its script name
    init = config["model"]["init_args"]
    if max_new_tokens is not None:
        init.get("sampling", init)["max_new_tokens"] = max_new_tokens
    init["policy"]["path"] = str(ROOT / init["policy"]["path"])
    for i, source in enumerate(config["data"]["train"] + config["data"].get("val", [])):
        source["init_args"]["root"] = str(tmp / f"data-{i}")
    path = tmp / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config))
    timer = importlib.import_module("gpu_check").StepTimer  # the class the CLI imports by its class_path
    timer.times, timer.rewards = [], []
    main(["fit", "--config", str(path)])
    times, rewards = timer.times, timer.rewards
    last = rewards[-5:]
    return {
        "steps": len(times),
        "reward_last5": round(sum(last) / len(last), 4),
        "step_s_median": round(sorted(times)[len(times) // 2], 3),
        "first_step_s": round(times[0], 3),
    }


def qlora_3b(device: str, tiny: bool, tmp: Path, compile: bool) -> dict:
    """The 3B QLoRA recipe's step (see the module doc), measured by ``bench/real_size.py``."""
    sys.path.insert(0, str(HERE))
    from real_size import build_checkpoint, measure

    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from published import published_checkpoint

        path = tmp / "Qwen2.5-VL-3B-Instruct"
        if not path.exists():
            published_checkpoint("Qwen2.5-VL-3B-Instruct", path)
        settings = dict(prompts=1, group=2, max_new_tokens=4, image_size=112)
    else:
        path = build_checkpoint("Qwen2.5-VL-3B-Instruct", tmp / "Qwen2.5-VL-3B-Instruct")
        settings = dict(prompts=2, group=8, max_new_tokens=1024, image_size=616)
    return measure(path, QLORA_3B, steps=2, device=device, compile=compile, **settings)


def _part(name: str, results: dict, fn, *args) -> None:
    start = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as exc:  # every part runs; the failure is reported, not raised
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    results[name]["wall_s"] = round(time.perf_counter() - start, 1)


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="the shrunk published layout, a few tokens")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--workdir", help="where checkpoints and runs go (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --tiny)")
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check-"))
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "tiny": args.tiny,
    }
    start = time.perf_counter()
    _part(
        "quickstart", results, quickstart, args.device, 2 if args.tiny else 20, tmp, 16 if args.tiny else None
    )
    _part("qlora_3b_compile_off", results, qlora_3b, args.device, args.tiny, tmp, False)
    if args.device == "cuda":
        _part("qlora_3b_compile_on", results, qlora_3b, args.device, args.tiny, tmp, True)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    line = json.dumps(results)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 1 if any(isinstance(v, dict) and "error" in v for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
