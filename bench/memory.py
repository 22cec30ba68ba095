"""Peak memory of GRPO training: QLoRA (4-bit base) against LoRA (fp32 base), and beta = 0 against beta > 0.

    python bench/memory.py --model runs/tiny-m      # the ~100 M checkpoint is written there if missing

Each configuration is one ``bench/grpo_step.py`` run in its own subprocess (a clean peak), on the same
~100 M-parameter Qwen2-VL checkpoint built from a config (``python -m dip_r1.tiny --size m``), on the CPU,
with small activations (B 1, G 2, T 8, one completion per micro-batch, gradient checkpointing) so that the
weights, not the activations, decide. The ``_released`` pair also copies the weights out of the
checkpoint's memory map after loading (``_common.release_load_memory``): what ``load_policy`` leaves
resident today against what it would with that fix.
Prints one JSON line: each run's ``peak_rss_mb`` (the whole process, loading included),
``train_peak_rss_mb`` (during the timed steps) and ``rss_after_import_mb`` (interpreter, torch,
transformers: no model), and the ratios, of the whole peak and of the peak above the imports (what the
model and its training take).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CONFIGS = {
    "lora_fp32": ["--lora-r", "16"],
    "qlora_4bit": ["--lora-r", "16", "--quantization", "4bit"],
    "lora_fp32_released": ["--lora-r", "16", "--release-load-memory"],
    "qlora_4bit_released": ["--lora-r", "16", "--quantization", "4bit", "--release-load-memory"],
    "lora_fp32_beta0.04": ["--lora-r", "16", "--beta", "0.04"],
}


def run(model: str, extra: list[str], args) -> dict:
    cmd = [sys.executable, str(HERE / "grpo_step.py"), "--model", model, "--prompts", str(args.prompts)]
    cmd += ["--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens), "--fixed-length"]
    cmd += ["--steps", str(args.steps), "--warmup", "1", "--image-size", str(args.image_size)]
    cmd += ["--micro-batch-size", "1", "--gradient-checkpointing", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    keep = (
        "peak_rss_mb",
        "train_peak_rss_mb",
        "rss_after_import_mb",
        "rss_after_load_mb",
        "weights_mb",
        "step_s",
    )
    return {k: result[k] for k in keep} | {
        "above_imports_mb": result["peak_rss_mb"] - result["rss_after_import_mb"]
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="~100 M checkpoint folder; written if missing")
    p.add_argument("--prompts", type=int, default=1, help="prompts per step (B)")
    p.add_argument("--group", type=int, default=2, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens per completion (fixed)")
    p.add_argument("--image-size", type=int, default=112, help="side of the square synthetic images")
    p.add_argument("--steps", type=int, default=1, help="measured steps after one warm-up step")
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        from dip_r1.tiny import save_tiny

        save_tiny(args.model, "qwen2_vl", "m")
    runs = {name: run(args.model, extra, args) for name, extra in CONFIGS.items()}
    lora, qlora, beta = runs["lora_fp32"], runs["qlora_4bit"], runs["lora_fp32_beta0.04"]
    lora_r, qlora_r = runs["lora_fp32_released"], runs["qlora_4bit_released"]

    def ratio(a: dict, b: dict, key: str) -> float:
        return round(a[key] / b[key], 3)

    print(
        json.dumps(
            {
                "qlora_over_lora_peak": ratio(qlora, lora, "peak_rss_mb"),
                "qlora_over_lora_above_imports": ratio(qlora, lora, "above_imports_mb"),
                "qlora_over_lora_train_peak": ratio(qlora, lora, "train_peak_rss_mb"),
                "released_qlora_over_lora_train_peak": ratio(qlora_r, lora_r, "train_peak_rss_mb"),
                "released_qlora_over_lora_train_peak_above_imports": round(
                    (qlora_r["train_peak_rss_mb"] - qlora_r["rss_after_import_mb"])
                    / (lora_r["train_peak_rss_mb"] - lora_r["rss_after_import_mb"]),
                    3,
                ),
                "qlora_over_lora_weights": ratio(qlora, lora, "weights_mb"),
                "beta_over_beta0_peak": ratio(beta, lora, "peak_rss_mb"),
                "beta_over_beta0_train_peak": ratio(beta, lora, "train_peak_rss_mb"),
                "runs": runs,
                "config": vars(args),
                "load_average": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
