"""Export a training checkpoint as a folder transformers loads: a peft adapter, or a full (merged) model.

    python -m dip_r1.export --ckpt runs/x/checkpoints/last.ckpt --out exported/x            # LoRA adapter
    python -m dip_r1.export --ckpt runs/x/checkpoints/last.ckpt --out exported/x --merge    # merged model

A LoRA checkpoint of :class:`~dip_r1.module.GRPOModule` or :class:`~dip_r1.sft.SFTModule` holds only the
trainable weights (``policy.<peft name>``); the frozen base is reloaded from the path the checkpoint records
(``--model`` overrides it). A full fine-tuning checkpoint always exports a full model. The processor files of
the base (tokenizer, image processor, chat template) are copied beside the weights, so that
``AutoModelForImageTextToText.from_pretrained(out)`` and ``dip_r1.models.load_processor(out)`` load the folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from dip_r1.config import LossConfig, SamplingConfig
from dip_r1.models import LoraSpec, PolicySpec, check_model_path, is_peft

PREFIX = "policy."
"""Prefix of the policy's weights in a module's state dict."""

# Files of a checkpoint folder that are weights or model config, never copied from the base: the exported
# folder gets its own (a copied config.json would make an adapter folder look like a full model).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_MODEL_FILES = {"config.json", "generation_config.json", "adapter_config.json"}
BASE_RECORDS = {"README.md", "scores.json"}
"""Files about the base model itself (its card, ``dip_r1.pretrain``'s scores): never copied to a trained one."""


def load_checkpoint(path: str | Path) -> dict:
    """Read a Lightning checkpoint file on the CPU with ``weights_only`` (our spec classes allowed)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a sharded (FSDP) checkpoint: consolidate it first with "
            f"`python -m lightning.pytorch.utilities.consolidate_checkpoint {path}`"
        )
    with torch.serialization.safe_globals([PolicySpec, LoraSpec, SamplingConfig, LossConfig]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _as_dict(value: Any) -> dict | None:
    """A PolicySpec as saved by ``save_hyperparameters``: the dataclass itself (module built in Python), a
    dict (built by the CLI, which records the parsed config), or a jsonargparse Namespace."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Namespace) or hasattr(value, "as_dict"):
        value = value.as_dict() if hasattr(value, "as_dict") else vars(value)
    value = dict(value)
    return dict(value.get("init_args", value))  # tolerate a class_path / init_args form


def spec_from_dict(values: dict) -> PolicySpec:
    """A :class:`PolicySpec` from its dict form (unknown keys are an error: they mean a mismatched version)."""
    values = dict(values)
    lora = _as_dict(values.pop("lora", None))
    return PolicySpec(**values, lora=LoraSpec(**lora) if lora is not None else None)


def _spec_from_config(path: str | Path) -> dict:
    """``model.init_args.policy`` of a LightningCLI config (the ``config.yaml`` a run writes to its log dir)."""
    import yaml

    config = yaml.safe_load(Path(path).read_text())
    model = config.get("fit", config).get("model", {})
    policy = model.get("init_args", model).get("policy")
    if policy is None:
        raise ValueError(f"{path} has no model.init_args.policy")
    return policy


def policy_spec_of(
    checkpoint: dict, model: str | Path | None = None, config: str | Path | None = None
) -> PolicySpec:
    """The :class:`PolicySpec` a checkpoint was trained with; ``model`` replaces its base path.

    Looked up in ``config`` (a CLI ``config.yaml``) when given, else ``hyper_parameters["policy"]``, else
    ``checkpoint["dip_r1"]["policy"]``; when none records it, a spec without LoRA on ``model`` or on
    ``checkpoint["dip_r1"]["model"]`` (enough for a full fine-tuning checkpoint).
    """
    recorded = checkpoint.get("dip_r1") or {}
    if config is not None:
        values = _as_dict(_spec_from_config(config))
    else:
        values = _as_dict((checkpoint.get("hyper_parameters") or {}).get("policy")) or _as_dict(
            recorded.get("policy")
        )
    if values is None:
        path = model or recorded.get("model")
        if path is None:
            raise ValueError("the checkpoint records no base model: pass --model PATH")
        values = {"path": str(path)}
    spec = spec_from_dict(values)
    if model is not None:
        spec = dataclasses.replace(spec, path=str(model))
    elif not Path(spec.path).expanduser().is_dir() and recorded.get("model"):
        spec = dataclasses.replace(spec, path=str(recorded["model"]))
    return spec


def policy_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The policy's weights of a module checkpoint, without the ``policy.`` prefix."""
    state = checkpoint["state_dict"]
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}


def restore_policy(checkpoint: dict, spec: PolicySpec, dtype: str | None = None):
    """``(model, processor)``: the base of ``spec`` in full precision (never quantised: adapters do not depend
    on it and merging needs real weights) with the checkpoint's weights loaded into it."""
    state = policy_state_dict(checkpoint)
    if spec.lora is None and any(".lora_" in k for k in state):
        raise ValueError(
            "the checkpoint holds LoRA weights but records no LoRA settings: pass --config <run>/config.yaml"
        )
    spec = dataclasses.replace(
        spec, quantization=None, gradient_checkpointing=False, dtype=dtype or spec.dtype
    )
    model, processor = spec.load()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint weights the policy does not have: {unexpected[:5]} ...")
    # A LoRA checkpoint holds only the trainable weights; everything trainable must be there.
    trained = {n for n, p in model.named_parameters() if p.requires_grad} if is_peft(model) else None
    missing = [k for k in missing if trained is None or k in trained]
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {missing[:5]} ...")
    return model.eval(), processor


def copy_processor_files(base: str | Path, out: str | Path) -> list[str]:
    """Copy the base folder's files that are neither weights, model config nor records of the base
    (``BASE_RECORDS``): tokenizer, image processor, chat template, processor_config.json; into ``out``,
    without overwriting what is there."""
    base, out = Path(base), Path(out)
    copied = []
    for f in sorted(base.iterdir()):
        skip = (
            f.name in _MODEL_FILES | BASE_RECORDS
            or f.name.endswith(_WEIGHT_SUFFIXES)
            or f.name.endswith(".index.json")
        )
        if f.is_file() and not skip and not f.name.startswith(".") and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return copied


def export(
    ckpt: str | Path,
    out: str | Path,
    *,
    merge: bool = False,
    model: str | Path | None = None,
    config: str | Path | None = None,
    dtype: str | None = None,
) -> Path:
    """Write the checkpoint's policy to ``out``: a peft adapter folder, or (``merge``, or full fine-tuning) a
    full model; plus the base's processor files. Returns ``out``.

    Args:
        ckpt: a Lightning checkpoint file of GRPOModule or SFTModule.
        out: the folder to write (created; files of the same name are replaced).
        merge: merge the LoRA adapters into the base weights and write a plain transformers model.
        model: base checkpoint folder, instead of the one the checkpoint records.
        config: the run's CLI ``config.yaml``, for checkpoints that do not record their PolicySpec.
        dtype: weight dtype of the export (default: the training dtype).
    """
    checkpoint = load_checkpoint(ckpt)
    spec = policy_spec_of(checkpoint, model, config)
    base = check_model_path(spec.path)
    policy, _ = restore_policy(checkpoint, spec, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft(policy) and not merge:
        for peft_config in policy.peft_config.values():
            # An absolute base path: the adapter folder loads from any working directory.
            peft_config.base_model_name_or_path = str(base.resolve())
        policy.save_pretrained(out)
    else:
        if is_peft(policy):
            policy = policy.merge_and_unload()
        policy.save_pretrained(out)
    copy_processor_files(base, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m dip_r1.export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ckpt", required=True, help="Lightning checkpoint (.ckpt) of GRPOModule or SFTModule"
    )
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--merge", action="store_true", help="merge LoRA adapters into a full model")
    parser.add_argument("--model", help="base checkpoint folder (default: the one the checkpoint records)")
    parser.add_argument("--config", help="the run's config.yaml, if the checkpoint records no PolicySpec")
    parser.add_argument("--dtype", help="weight dtype of the export, e.g. bfloat16 (default: training dtype)")
    args = parser.parse_args(argv)
    out = export(
        args.ckpt, args.out, merge=args.merge, model=args.model, config=args.config, dtype=args.dtype
    )
    print(f"dip_r1: exported {args.ckpt} -> {out}")
    return out


if __name__ == "__main__":
    main()
