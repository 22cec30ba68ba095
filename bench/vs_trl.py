"""GRPO step time and memory of dip_r1 against TRL's GRPOTrainer on the same tiny checkpoint; prints one JSON line.

    python -m dip_r1.tiny --out runs/tiny-s --size s
    python bench/vs_trl.py --model runs/tiny-s --prompts 2 --group 8 --max-new-tokens 128 --image-size 448
    python bench/vs_trl.py --preset outside

``--preset outside`` is the harness a new user would set up: the tiny Qwen2.5-VL (size s, built at
``runs/tiny-qwen2_5_vl-s`` if missing), the short user prompt and no system prompt, LoRA r 8 without dropout,
beta 0.04, B 2, G 8, T 128, 448 px, and TRL's own defaults on TRL's side (``loss_type`` dapo, gradient
checkpointing); dip_r1 runs its defaults. Flags given on the command line override the preset.

Both sides: the same checkpoint, LoRA adapters (same rank, alpha, dropout, targets: ``load_policy``), B
prompts of the same synthetic images and text, G completions each of exactly T tokens (EOS suppressed
until T: ``min_new_tokens``), temperature 1, beta, one optimiser step per generation (``num_iterations`` 1),
AdamW with the same learning rate and no weight decay, gradient norm clipped at 1, fp32 on the CPU with
subnormal floats flushed to zero (``_common.flush_denormals``: random weights make them, and they slow the
CPU down tenfold). Each
run is a fresh subprocess (clean peak RSS); the two sides alternate, ``--rounds`` times, the order flipped
every round. A step is timed from its start to the end of its optimiser step (dip_r1: Lightning's
``on_train_batch_start`` / ``_end``; TRL: the HF Trainer's ``on_step_begin`` / ``on_step_end``), and the
first ``--warmup`` steps of each run are not counted.

Keys: ``ratio`` (median over rounds of dip_r1 step_s / TRL step_s), ``ratio_of_medians``, each side's
median ``step_s``, ``tokens_per_s``, ``peak_rss_mb`` and vision-encoder images per step.
``--side trl`` runs one TRL measurement (what the comparison starts as a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="settings of a harness")
    p.add_argument("--model", help="tiny checkpoint (python -m dip_r1.tiny --size s); built if missing")
    p.add_argument("--family", default="qwen2_vl", help="family of the tiny checkpoint built when missing")
    p.add_argument("--short-prompt", action="store_true", help="no system prompt, the short user prompt")
    p.add_argument(
        "--trl-defaults", action="store_true", help="TRL keeps its own loss_type (dapo); else grpo on both"
    )
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (B)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per completion (T), fixed")
    p.add_argument("--image-size", type=int, default=448, help="side of the square synthetic images")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (both sides)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (both sides)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (both sides)")
    p.add_argument("--beta", type=float, default=0.0, help="KL weight (both sides)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (both sides)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    p.add_argument("--rounds", type=int, default=3, help="runs of each side, alternated")
    p.add_argument("--micro-batch-size", type=int, default=8, help="dip_r1's completions per scoring forward")
    p.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    preset = p.parse_known_args(argv)[0].preset
    p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    if args.model is None:
        p.error("give --model DIR (or --preset outside)")
    return args


PRESETS = {
    "default": {},
    "outside": dict(
        model="runs/tiny-qwen2_5_vl-s",
        family="qwen2_5_vl",
        short_prompt=True,
        trl_defaults=True,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        beta=0.04,
    ),
}


# ------------------------------------------------------------------------------------------------ TRL side
def trl_step(args) -> dict:
    """One TRL GRPOTrainer run: median step time, peak RSS, vision images per step."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dip_r1.models import LoraSpec, load_policy

    start_rss = _common.rss_mb()
    _common.flush_denormals()  # as bench/grpo_step.py does
    torch.manual_seed(args.seed)
    lora = LoraSpec(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    model, processor = load_policy(args.model, lora=lora)  # the very adapters dip_r1 trains
    processor.tokenizer.padding_side = "left"
    rows = [
        {"prompt": _common.messages(args.short_prompt), "image": im}
        for im in _common.images(args.prompts, args.image_size)
    ]
    dataset = Dataset.from_list(rows)

    def digits(completions, **kwargs) -> list[float]:
        """A cheap reward (the share of digits): the comparison is about the trainers, not the rewards."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]

    images = {"n": 0}
    visual = next(m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "visual")
    visual.register_forward_hook(
        lambda m, a, kw, out: images.__setitem__("n", images["n"] + len(kw.get("grid_thw", a[1:2] and a[1]))),
        with_kwargs=True,
    )
    steps: list[dict] = []
    peaks: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if len(steps) == args.warmup:
                peaks.append(_common.peak_rss_mb())
                _common.reset_peak_rss()
            images["n"] = 0
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            steps.append({"step_s": time.perf_counter() - self.start, "images": images["n"]})

    n = args.prompts * args.group
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=n,  # TRL counts completions: B prompts x G
            num_generations=args.group,
            max_completion_length=args.max_new_tokens,
            generation_kwargs={"min_new_tokens": args.max_new_tokens},
            temperature=1.0,
            top_p=1.0,
            beta=args.beta,
            num_iterations=1,
            **({} if args.trl_defaults else {"loss_type": "grpo"}),
            scale_rewards="group",
            learning_rate=args.lr,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            max_grad_norm=1.0,
            gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps,
            use_vllm=False,
            bf16=False,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=10**6,
            dataloader_num_workers=0,
            seed=args.seed,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=digits,
            args=config,
            train_dataset=dataset,
            processing_class=processor,
            callbacks=[Timer()],
        )
        trainer.train()
    timed = steps[args.warmup :]
    step_s = statistics.median(s["step_s"] for s in timed)
    return {
        "step_s": round(step_s, 4),
        "tokens_per_s": round(n * args.max_new_tokens / step_s, 2),
        "peak_rss_mb": round(max(*peaks, _common.peak_rss_mb()), 1),
        "train_peak_rss_mb": round(_common.peak_rss_mb(), 1),
        "rss_after_import_mb": round(start_rss, 1),
        "vision_calls_per_step": statistics.median(s["images"] for s in timed),
        "step_s_all": [round(s["step_s"], 4) for s in timed],
    }


# ------------------------------------------------------------------------------------------------ driver
def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, env={**os.environ})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args) -> dict:
    if not (Path(args.model) / "config.json").is_file():
        from dip_r1.tiny import save_tiny

        save_tiny(args.model, args.family, "s")
    common = ["--model", args.model, "--prompts", str(args.prompts), "--group", str(args.group)]
    common += ["--max-new-tokens", str(args.max_new_tokens), "--image-size", str(args.image_size)]
    common += ["--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha)]
    common += ["--lora-dropout", str(args.lora_dropout), "--beta", str(args.beta), "--lr", str(args.lr)]
    common += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    common += ["--short-prompt"] if args.short_prompt else []
    dip_cmd = [sys.executable, str(HERE / "grpo_step.py"), *common, "--fixed-length"]
    dip_cmd += ["--micro-batch-size", str(args.micro_batch_size), "--no-bounds"]
    trl_cmd = [sys.executable, str(HERE / "vs_trl.py"), *common, "--side", "trl"]
    trl_cmd += ["--trl-defaults"] if args.trl_defaults else []
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"dip_r1": [], "trl": []}
    for r in range(args.rounds):
        order = [("dip_r1", dip_cmd), ("trl", trl_cmd)]
        for name, cmd in order if r % 2 == 0 else order[::-1]:
            runs[name].append(_run(cmd))
    ratios = [d["step_s"] / t["step_s"] for d, t in zip(runs["dip_r1"], runs["trl"])]

    def side(rs: list[dict]) -> dict:
        return {
            "step_s": statistics.median(r["step_s"] for r in rs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
            "train_peak_rss_mb": statistics.median(r["train_peak_rss_mb"] for r in rs),
            "rss_after_import_mb": statistics.median(r["rss_after_import_mb"] for r in rs),
            "vision_calls_per_step": rs[0]["vision_calls_per_step"],
            "step_s_runs": [r["step_s"] for r in rs],
        }

    dip, trl = side(runs["dip_r1"]), side(runs["trl"])
    return {
        "ratio": round(statistics.median(ratios), 3),
        "ratio_of_medians": round(dip["step_s"] / trl["step_s"], 3),
        "ratios": [round(x, 3) for x in ratios],
        "dip_r1": dip,
        "trl": trl,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "config": {k: v for k, v in vars(args).items() if k != "side"},
        "versions": _versions(),
    }


def _versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "trl", "peft", "lightning")}


def main(argv=None) -> None:
    args = parse_args(argv)
    print(json.dumps(trl_step(args) if args.side == "trl" else compare(args)))


if __name__ == "__main__":
    main()
