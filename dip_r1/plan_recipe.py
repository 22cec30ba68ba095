"""``dip-r1 plan``: read a recipe as ``dip-r1 fit`` would (configs, then dotted overrides), find its checkpoint's
``config.json``, print the memory planner's table (:mod:`dip_r1.plan`) and a verdict against a GPU's memory.

    dip-r1 plan --config recipes/qwen2_5_vl_3b_crowdhuman_qlora.yaml --gpu-memory 24GB
    dip-r1 plan --config recipes/qwen2_5_vl_3b_crowdhuman_qlora.yaml --model.init_args.micro_batch_size 1

A recipe whose ``policy.path`` holds no ``config.json`` yet (the published folder not fetched) is planned with the
published sizes of the checkpoint its folder is named after (:mod:`dip_r1.architectures`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from dip_r1.architectures import PUBLISHED, published_config
from dip_r1.plan import GIB, Plan, PlanError, Shape, StepSettings, advice, estimate

# The published processors' pixel limits, used when neither the recipe nor the folder sets one.
_PROCESSOR_MAX_PIXELS = {
    "qwen2_vl": 12845056,
    "qwen2_5_vl": 12845056,
    "qwen3_vl": 16777216,
    "qwen3_5": 16777216,
}
_ASSUMED_DEVICES = 8  # devices: auto, for sharding: what the multi-GPU recipes are written for


def read_recipe(configs: list[str], overrides: list[str]) -> dict:
    """The recipe YAML files merged in order, then ``--a.b.c value`` overrides (values parsed as YAML)."""
    recipe: dict = {}
    for path in configs:
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"no recipe at {p}")
        try:
            _merge(recipe, yaml.safe_load(p.read_text()) or {})
        except yaml.YAMLError as exc:
            raise PlanError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    items = list(overrides)
    while items:
        key = items.pop(0)
        if not key.startswith("--"):
            raise PlanError(f"expected --key value, got {key!r}")
        key, _, value = key[2:].partition("=")
        if not _:
            if not items:
                raise PlanError(f"--{key} has no value")
            value = items.pop(0)
        node = recipe
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return recipe


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def checkpoint_config(path: str) -> tuple[dict, str]:
    """``(config.json dict, where it came from)``: the folder's own, else the published sizes of the checkpoint
    the folder is named after."""
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text()), str(folder / "config.json")
    if folder.name in PUBLISHED:
        return published_config(folder.name), f"published {folder.name} sizes (no config.json at {folder})"
    raise PlanError(
        f"no config.json at {folder}, and {folder.name!r} names no published checkpoint the planner knows "
        f"({', '.join(PUBLISHED)})"
    )


def _get(node: dict, *keys: str, default=None):
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def settings_of(
    recipe: dict, shape: Shape, folder: Path | None = None, devices: int | None = None
) -> StepSettings:
    """What the recipe sets that decides the memory, with GRPOModule's, PolicySpec's and the DataModule's
    defaults where it is silent (checked against their signatures in the tests)."""
    init = _get(recipe, "model", "init_args", default={}) or {}
    policy = init.get("policy") or {}
    if isinstance(policy, dict) and "init_args" in policy:
        policy = policy["init_args"]
    sampling = {**init, **(init.get("sampling") or {})}  # flat or grouped sampling settings
    lora = policy.get("lora")
    optimizer = init.get("optimizer") or "torch.optim.AdamW"
    optimizer = optimizer.get("class_path", "") if isinstance(optimizer, dict) else str(optimizer)
    builder = _get(recipe, "data", "prompt_builder", "init_args", default={}) or {}
    max_pixels = (
        builder.get("max_pixels") or _folder_max_pixels(folder) or _PROCESSOR_MAX_PIXELS[shape.family]
    )
    trainer = recipe.get("trainer") or {}
    strategy = trainer.get("strategy")
    name = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy or "")
    shards = 1
    if "fsdp" in name.lower():
        count = trainer.get("devices", 1)
        shards = devices or (count if isinstance(count, int) else _ASSUMED_DEVICES)
    return StepSettings(
        quantization=policy.get("quantization"),
        lora_r=(lora.get("r", 16) if isinstance(lora, dict) else None),
        dtype=policy.get("dtype", "float32"),
        gradient_checkpointing=bool(policy.get("gradient_checkpointing", False)),
        prompts=int(_get(recipe, "data", "batch_size", default=2)),
        group_size=int(init.get("group_size", 8)),
        max_new_tokens=int(sampling.get("max_new_tokens", 256)),
        micro_batch_size=int(init.get("micro_batch_size", 8)),
        share_prompt_prefix=bool(init.get("share_prompt_prefix", True)),
        optimizer=optimizer,
        precision=str(trainer.get("precision", "32-true")),
        image_tokens=int(max_pixels) // shape.factor**2,
        shards=shards,
    )


def _folder_max_pixels(folder: Path | None) -> int | None:
    f = folder / "preprocessor_config.json" if folder is not None else None
    if f is None or not f.is_file():
        return None
    pre = json.loads(f.read_text())
    return pre.get("max_pixels") or (pre.get("size") or {}).get("longest_edge")


def plan_for(config: dict, recipe: dict, **overrides) -> Plan:
    """The plan of ``recipe`` on the model of ``config``, with :class:`~dip_r1.plan.StepSettings` fields
    overridden (``prompts``, ``group``, ``max_new_tokens``, ``image_pixels``, ``prompt_tokens``, ...)."""
    from dataclasses import replace

    shape = Shape.from_config(config)
    settings = settings_of(recipe, shape)
    names = {"group": "group_size"}
    fields = {names.get(k, k): v for k, v in overrides.items() if k != "image_pixels"}
    if "image_pixels" in overrides:
        fields["image_tokens"] = overrides["image_pixels"] // shape.factor**2
    return estimate(shape, replace(settings, **fields))


def parse_size(text: str) -> float:
    """``"24GB"``, ``"24GiB"``, ``"80"`` (GiB) -> bytes. GPU memory is sold in GiB named GB: both mean GiB."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|g)?\s*", text.lower())
    if not m:
        raise PlanError(f"--gpu-memory {text!r}: give a size such as 24GB")
    return float(m.group(1)) * GIB


_ROWS = (
    ("base_weights", "base weights"),
    ("adapters", "adapters"),
    ("gradients", "gradients"),
    ("optimizer_state", "optimizer state"),
    ("kv_cache", "rollout KV cache"),
    ("rollout_transient", "rollout vision / prefill / logits"),
    ("activations", "activations, no checkpointing"),
    ("activations_checkpointed", "activations, checkpointing"),
    ("logprob_chunk", "log-prob logits"),
)


def report(plan: Plan, budget: float, title: str, shape: Shape) -> str:
    """The table, the two peaks, the verdict and, when it does not fit, what to turn."""
    st = plan.settings
    used = "activations_checkpointed" if st.gradient_checkpointing else "activations"
    lines = [
        title,
        f"B {st.prompts} x G {st.group_size} = {st.prompts * st.group_size} rollouts of {st.prompt_len} prompt "
        f"+ {st.max_new_tokens} new tokens ({st.image_tokens} image tokens), micro-batch {st.micro_batch_size}, "
        f"{st.quantization or st.dtype} base, {f'LoRA r {st.lora_r}' if st.lora_r else 'full fine-tuning'}, "
        f"{st.precision}",
        f"{'component':<40}{'GiB':>8}  note",
    ]
    for key, label in _ROWS:
        mark = " (unused)" if key in ("activations", "activations_checkpointed") and key != used else ""
        lines.append(f"{label + mark:<40}{plan.components[key] / GIB:>8.2f}  {plan.notes.get(key, '')}")
    lines.append(
        f"{'peak = persistent + max(rollout, loss)':<40}{plan.total / GIB:>8.2f}  persistent "
        f"{plan.persistent / GIB:.2f}, rollout {plan.rollout_peak / GIB:.2f}, loss {plan.loss_peak / GIB:.2f}"
    )
    spare = budget - plan.total
    if spare >= 0:
        lines.append(
            f"fits in {budget / GIB:.0f} GiB: {spare / GIB:.1f} GiB spare (CUDA context and fragmentation take ~1)"
        )
    else:
        lines.append(f"does not fit in {budget / GIB:.0f} GiB: {-spare / GIB:.1f} GiB over")
        steps = advice(shape, st, budget)
        for key, value, total in steps:
            lines.append(f"  turn --{key} {value}  -> {total / GIB:.2f} GiB")
        if not steps or steps[-1][2] > budget:
            lines.append("  no single-GPU setting fits: a smaller model, 4-bit weights, or more GPUs")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``dip-r1 plan`` on ``argv`` (after the word ``plan``); prints the report, returns the exit status."""
    p = argparse.ArgumentParser(
        prog="dip-r1 plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", action="append", required=True, help="recipe YAML (repeatable, merged in order)"
    )
    p.add_argument("--gpu-memory", default="24GB", help="the GPU's memory (default 24GB)")
    p.add_argument("--devices", type=int, help="GPUs an FSDP recipe shards over (devices: auto -> 8)")
    args, overrides = p.parse_known_args(argv)
    try:
        recipe = read_recipe(args.config, overrides)
        budget = parse_size(args.gpu_memory)
        path = _get(recipe, "model", "init_args", "policy", "path") or _get(
            recipe, "model", "init_args", "policy", "init_args", "path"
        )
        module = _get(recipe, "model", "class_path", default="")
        if not str(module).endswith("GRPOModule"):
            raise PlanError(
                f"the planner plans GRPO steps (dip_r1.module.GRPOModule); the recipe's model is {module!r}"
            )
        if not path:
            raise PlanError(f"{args.config[-1]} sets no model.init_args.policy.path")
        config, source = checkpoint_config(path)
        shape = Shape.from_config(config)
        folder = Path(path).expanduser()
        settings = settings_of(recipe, shape, folder if folder.is_dir() else None, args.devices)
    except PlanError as exc:
        print(f"dip-r1: error: {exc}", file=sys.stderr)
        return 2
    title = f"dip-r1 plan: {' + '.join(args.config)} on {source}"
    print(report(estimate(shape, settings), budget, title, shape))
    return 0
