"""GRPO steps of a published Qwen model at its full size, random weights, on the CPU; prints one JSON line.

    nice -n 10 python bench/real_size.py --family qwen2_5_vl --size 3b          # NF4 QLoRA, the recipe's way
    nice -n 10 python bench/real_size.py --family qwen3_vl --size 2b --mode lora

The checkpoint is the published folder layout of ``tests/fixtures/published`` (its token ids, tokenizer
arrangement, processor and chat template) with every size of the published ``config.json``
(:mod:`dip_r1.architectures`) and seeded random weights, written tensor by tensor from a model built on the meta
device (a 3B model is never whole in memory). It is loaded by the family's QLoRA recipe through
``GRPOModule`` / ``load_policy`` exactly as ``dip-r1 fit`` loads it (NF4 base, LoRA, gradient checkpointing, the
8-bit optimiser, ``bf16-mixed``), the recipe's settings scaled only in B (``--prompts``), G (``--group``) and T
(``--max-new-tokens``, every completion exactly T tokens) and the image (``--image-size``, square noise).
``--mode lora`` drops the quantisation (a bfloat16 base).

The first step is timed (``step_s``: rollout, rewards, loss, backward, optimiser); the last one is also counted
(``bench/_live.py``): the live tensor bytes by kind, the peak of the tensors the rollout and the loss allocate
(``rollout_peak`` includes the KV cache, ``loss_peak`` is the loss phase's peak less the gradients), and beside them the
memory planner's estimate of the same step (``dip_r1.plan``), component by component, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import _common

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPES = {
    "qwen2_5_vl": "recipes/qwen2_5_vl_3b_crowdhuman_qlora.yaml",
    "qwen3_vl": "recipes/qwen3_vl_2b_crowdhuman_qlora.yaml",
    "qwen3_5": "recipes/qwen3_5_4b_crowdhuman_qlora.yaml",
}
SHARD_BYTES = 1 << 30


def write_random_weights(folder: Path, seed: int = 0, dtype: str = "bfloat16") -> int:
    """Seeded random weights of ``folder/config.json`` as safetensors shards of at most 1 GiB; returns the
    number of parameters. Built on the meta device: only one shard is ever in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    gen = torch.Generator().manual_seed(seed)
    shard: dict = {}
    files: list[str] = []
    weight_map: dict[str, int] = {}
    total, seen = 0, set()

    def flush() -> None:
        files.append(f"part-{len(files) + 1}.safetensors")
        save_file(shard, folder / files[-1], metadata={"format": "pt"})
        shard.clear()

    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied weights: written once, as save_pretrained does
            continue
        seen.add(id(t))
        value = torch.empty(t.shape, dtype=t.dtype)
        if t.dim() >= 2:
            value.normal_(0.0, 0.02, generator=gen)
        elif "norm" in name or name.endswith("dt_bias"):
            value.fill_(1.0)  # norms at one: activations keep their scale through 30+ random layers
        else:
            value.zero_()
        if shard and sum(v.nbytes for v in shard.values()) + value.nbytes > SHARD_BYTES:
            flush()
        shard[name] = value
        weight_map[name] = len(files)
        total += value.numel()
    flush()
    names = [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    for old, new in zip(files, names):
        (folder / old).rename(folder / new)
    index = {"metadata": {}, "weight_map": {n: names[i] for n, i in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def build_checkpoint(name: str, out: Path, seed: int = 0) -> Path:
    """The published folder layout of ``name`` at its full size with random weights, at ``out`` (reused when
    complete)."""
    from dip_r1.architectures import PUBLISHED, resize

    sys.path.insert(0, str(ROOT / "tests"))
    from published import FIXTURES, write_tokenizer

    if (out / "model.safetensors.index.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(FIXTURES / PUBLISHED[name]["fixture"], out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(resize(config, name), indent=2))
    write_tokenizer(out)
    write_random_weights(out, seed)
    return out


def recipe_module(
    recipe: Path, path: Path, *, quantized: bool, group: int, max_new_tokens: int, compile: bool
):
    """``GRPOModule`` of the recipe's ``model`` section, as the CLI builds it, with the checkpoint path, G and T
    (every completion exactly T tokens) set; ``quantized=False`` drops the 4-bit base. Returns it and the recipe."""
    import lightning as L
    import yaml
    from jsonargparse import ArgumentParser

    config = yaml.safe_load(recipe.read_text())
    model = config["model"]
    init = model["init_args"]
    init["policy"]["path"] = str(path)
    if not quantized:
        init["policy"]["quantization"] = None
    sampling = init.setdefault("sampling", {})
    sampling["max_new_tokens"] = sampling["min_new_tokens"] = max_new_tokens
    init["group_size"] = group
    init["rollout_compile"] = compile
    parser = ArgumentParser()
    parser.add_subclass_arguments(L.LightningModule, "model", fail_untyped=False)
    built = parser.instantiate_classes(parser.parse_object({"model": model}))
    return built.model, config


def measure(
    path: Path,
    recipe: Path,
    *,
    quantized: bool = True,
    prompts: int = 1,
    group: int = 2,
    max_new_tokens: int = 32,
    image_size: int = 448,
    steps: int = 2,
    device: str = "cpu",
    compile: bool = False,
    seed: int = 0,
) -> dict:
    """Run ``steps`` GRPO steps of ``recipe`` on the checkpoint at ``path`` and measure them (see the module
    doc). On the CPU the last step's live tensors are counted by kind; on CUDA ``max_memory_allocated``."""
    import lightning as L
    import torch
    from _live import LiveBytes, model_bytes

    from dip_r1.plan_recipe import plan_for

    L.seed_everything(seed, verbose=False)
    module, config = recipe_module(
        recipe, path, quantized=quantized, group=group, max_new_tokens=max_new_tokens, compile=compile
    )
    t0 = time.perf_counter()
    module.configure_model()
    load_s = time.perf_counter() - t0
    loaded_rss = _common.rss_mb()
    empty = {"boxes": torch.zeros(0, 4), "ignore": torch.zeros(0, 4), "image_size": (image_size, image_size)}
    inputs = _common.prompt_inputs(module.processor, prompts, image_size)
    batch = {"inputs": inputs, "targets": [empty] * prompts}
    cuda = device == "cuda"
    live = LiveBytes(phase_of=lambda: "rollout" if module.phase == "rollout" else "loss")
    records: list[dict] = []
    vision = {"calls": 0}
    visual = next(m for n, m in module.policy.named_modules() if n.rsplit(".", 1)[-1] == "visual")
    visual.register_forward_hook(lambda *a: vision.__setitem__("calls", vision["calls"] + 1))
    live.watch_cache(module.policy)
    grads: dict = {}
    counted = steps - 1

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            records.append({"vision_before": vision["calls"]})
            if batch_idx == counted and not cuda:
                live.__enter__()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            records[-1]["step_s"] = time.perf_counter() - self.start
            records[-1]["rollout_s"] = pl_module.step_timings["rollout_s"]
            records[-1]["vision_calls"] = vision["calls"] - records[-1].pop("vision_before")
            if batch_idx == counted:
                records[-1]["bytes"] = model_bytes(pl_module.policy, pl_module.optimizers().optimizer)
                if not cuda:
                    live.__exit__(None, None, None)

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield batch

    trainer = L.Trainer(
        max_steps=steps,
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision=config.get("trainer", {}).get("precision", "32-true"),
        logger=False,
        callbacks=[Probe()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    _capture_gradients(module, grads)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, torch.utils.data.DataLoader(Repeat(), batch_size=None))
    measured = dict(records[-1]["bytes"])
    measured["gradients"] = grads.get("bytes", measured["gradients"])
    if cuda:
        measured["total"] = torch.cuda.max_memory_allocated()
    else:
        measured["kv_cache"] = live.kv_cache
        measured["rollout_peak"] = live.peaks.get("rollout", 0)
        # the loss phase's peak less what outlives it: the gradients, and the optimiser state when this step
        # created it (the first step)
        created = measured["optimizer_state"] if counted == 0 else 0
        measured["loss_peak"] = max(live.peaks.get("loss", 0) - measured["gradients"] - created, 0)
        measured["total"] = (
            measured["base_weights"]
            + measured["adapters"]
            + measured["optimizer_state"]
            + measured["gradients"]
            + max(measured["rollout_peak"], measured["loss_peak"])
        )
    estimate = plan_for(
        json.loads((Path(path) / "config.json").read_text()),
        config,
        prompts=prompts,
        group=group,
        max_new_tokens=max_new_tokens,
        image_pixels=image_size * image_size,
        prompt_tokens=int(inputs["input_ids"].shape[1]),
        quantization="4bit" if quantized else None,
    ).as_bytes()
    tokens = prompts * group * max_new_tokens
    mib = {k: round(v / 2**20, 1) for k, v in measured.items()}
    return {
        "step_s": [round(r["step_s"], 3) for r in records],
        "rollout_s": [round(r["rollout_s"], 3) for r in records],
        "rollout_tokens_per_s": round(tokens / records[-1]["rollout_s"], 2),
        "vision_calls_per_step": records[0]["vision_calls"],
        "tokens_per_step": tokens,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "peak_rss_mb": round(_common.peak_rss_mb(), 1),
        "rss_after_load_mb": round(loaded_rss, 1),
        "load_s": round(load_s, 1),
        ("max_memory_allocated_mib" if cuda else "live_mib"): mib,
        "planner_mib": {k: round(v / 2**20, 1) for k, v in estimate.items() if k in mib},
        "planner_over_measured": {
            k: round(estimate[k] / measured[k], 3) for k in mib if measured[k] and k in estimate
        },
        "parameters": sum(p.numel() for p in module.policy.parameters()),
        "recipe": str(recipe.relative_to(ROOT)) if recipe.is_relative_to(ROOT) else str(recipe),
        "settings": dict(
            prompts=prompts,
            group=group,
            max_new_tokens=max_new_tokens,
            image_size=image_size,
            quantized=quantized,
            device=device,
            compile=compile,
            steps=steps,
        ),
        "torch_threads": torch.get_num_threads(),
    }


def run(args) -> dict:
    """Build (or reuse) the published model of ``--family`` / ``--size`` and measure its steps."""
    from dip_r1.architectures import SIZES

    name = SIZES[(args.family, args.size)]
    t0 = time.perf_counter()
    path = build_checkpoint(name, Path(args.cache) / name, args.seed)
    build_s = time.perf_counter() - t0
    out = measure(
        path,
        ROOT / (args.recipe or RECIPES[args.family]),
        quantized=args.mode == "qlora",
        prompts=args.prompts,
        group=args.group,
        max_new_tokens=args.max_new_tokens,
        image_size=args.image_size,
        steps=args.steps,
        seed=args.seed,
    )
    return {
        "model": name,
        "mode": args.mode,
        "build_s": round(build_s, 1),
        **out,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _capture_gradients(module, out: dict) -> None:
    """Record the adapters' gradient bytes just before the optimiser step (the module zeroes them after)."""

    def hook(optimizer, args, kwargs):
        from _live import storage_bytes

        out["bytes"] = storage_bytes(
            p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None
        )

    original = module.configure_optimizers

    def configure():
        result = original()
        opt = result[0] if isinstance(result, (list, tuple)) else result
        opt = opt["optimizer"] if isinstance(opt, dict) else opt
        opt.register_step_pre_hook(hook)
        return result

    module.configure_optimizers = configure


def main(argv=None) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, choices=sorted(RECIPES))
    p.add_argument(
        "--size", required=True, help="3b, 7b (qwen2_5_vl); 2b, 4b, 8b (qwen3_vl); 2b, 4b (qwen3_5)"
    )
    p.add_argument("--mode", choices=["qlora", "lora"], default="qlora", help="NF4 base (recipe) or bf16")
    p.add_argument("--recipe", help="recipe YAML (default: the family's QLoRA recipe)")
    p.add_argument("--prompts", type=int, default=1, help="prompts per step (B)")
    p.add_argument("--group", type=int, default=2, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per completion (T), exactly")
    p.add_argument("--image-size", type=int, default=448, help="side of the square noise image")
    p.add_argument("--steps", type=int, default=2, help="optimiser steps; the last one is counted")
    p.add_argument("--cache", default="runs/real_size", help="where the random checkpoints are written")
    p.add_argument("--remove", action="store_true", help="delete the checkpoint afterwards")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from dip_r1.architectures import SIZES

    if (args.family, args.size) not in SIZES:
        p.error(
            f"no published {args.family} of size {args.size}: {sorted(s for f, s in SIZES if f == args.family)}"
        )
    _common.flush_denormals()
    try:
        print(json.dumps(run(args)))
    finally:
        if args.remove:
            shutil.rmtree(Path(args.cache) / SIZES[(args.family, args.size)], ignore_errors=True)


if __name__ == "__main__":
    main()
