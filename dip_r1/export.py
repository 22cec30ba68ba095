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
import json
import shutil
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from dip_r1 import preflight
from dip_r1.config import LossConfig, SamplingConfig
from dip_r1.models import LoraSpec, PolicySpec, is_peft

PREFIX = "policy."
"""Prefix of the policy's weights in a module's state dict."""

# Files of a checkpoint folder that are weights or model config, never copied from the base: the exported
# folder gets its own (a copied config.json would make an adapter folder look like a full model).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_MODEL_FILES = {"config.json", "generation_config.json", "adapter_config.json"}
BASE_RECORDS = {"README.md", "scores.json"}
"""Files about the base model itself (its card, ``dip_r1.pretrain``'s scores): never copied to a trained one."""
EXPORT_RECORD = "dip_r1_export.json"
"""Written into every exported folder: what it was exported from; an export replaces only such a folder."""


def load_checkpoint(path: str | Path) -> dict:
    """Read a Lightning checkpoint file on the CPU with ``weights_only`` (our spec classes allowed)."""
    path = Path(path)
    if path.is_dir():
        raise preflight.InputError(
            "checkpoint",
            path,
            "a sharded (FSDP) checkpoint folder",
            f"consolidate it first: python -m lightning.pytorch.utilities.consolidate_checkpoint {path}",
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
    """The :class:`PolicySpec` a checkpoint was trained with; ``model`` replaces its base path, and the absolute
    base path the run recorded (``checkpoint["dip_r1"]["model"]``) replaces a relative one when it is there.

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
    at_training = Path(recorded.get("model") or "")  # absolute when the run recorded where it found the base
    if model is not None:
        spec = dataclasses.replace(spec, path=str(model))
    elif recorded.get("model") and (
        (at_training.is_absolute() and at_training.is_dir()) or not Path(spec.path).expanduser().is_dir()
    ):
        spec = dataclasses.replace(spec, path=str(recorded["model"]))
    return spec


def find_base(path: str | Path, ckpt: str | Path) -> Path:
    """A base folder the checkpoint names by a relative path (relative to the folder its run started in):
    from the working folder when it is there, else from the first folder above the checkpoint that holds it
    (``runs/x/checkpoints/last.ckpt`` -> the folder holding ``runs/``)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    for folder in Path(ckpt).resolve().parents:
        if (folder / p).is_dir():
            return folder / p
    return p


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
    overwrite: bool = False,
) -> Path:
    """Write the checkpoint's policy to ``out``: a peft adapter folder, or (``merge``, or full fine-tuning) a
    full model; plus the base's processor files. Returns ``out``.

    Args:
        ckpt: a Lightning checkpoint file of GRPOModule or SFTModule.
        out: the folder to write: new, empty, or an earlier export (its ``dip_r1_export.json``); any other
            folder (a model it did not write, the base itself) only with ``overwrite``, the base never.
        merge: merge the LoRA adapters into the base weights and write a plain transformers model.
        model: base checkpoint folder, instead of the one the checkpoint records.
        config: the run's CLI ``config.yaml``, for checkpoints that do not record their PolicySpec.
        dtype: weight dtype of the export (default: the training dtype).
        overwrite: write into ``out`` even when it holds files this command did not write.
    """
    preflight.check_checkpoint(ckpt, flag="--ckpt")
    checkpoint = load_checkpoint(ckpt)
    spec = policy_spec_of(checkpoint, model, config)
    base = preflight.check_model_folder(find_base(spec.path, ckpt), what="base model", flag="--model")
    spec = dataclasses.replace(spec, path=str(base))
    out = check_out(out, base, overwrite)
    policy, _ = restore_policy(checkpoint, spec, dtype)
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
    record = {"ckpt": str(Path(ckpt).resolve()), "base": str(base.resolve()), "merged": bool(merge)}
    (out / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out


def check_out(out: str | Path, base: Path, overwrite: bool = False) -> Path:
    """``out`` when an export may write there: not the base model's folder, and new, empty, an earlier export,
    or ``overwrite``."""
    out = Path(out)
    if out.exists() and out.resolve() == base.resolve():
        raise preflight.InputError(
            "--out", out, "it is the base model's own folder", "export to a new folder"
        )
    if not out.exists() or overwrite or (out / EXPORT_RECORD).is_file():
        return out
    if not out.is_dir():
        raise preflight.InputError("--out", out, "a file, not a folder", "export to a new folder")
    if any(out.iterdir()):
        raise preflight.InputError(
            "--out",
            out,
            f"it holds files an export did not write (no {EXPORT_RECORD})",
            "export to a new folder, or pass --overwrite",
        )
    return out


def main(argv: list[str] | None = None) -> Path:
    """``python -m dip_r1.export``; a bad input exits with status 2 and one line (``--debug``: a traceback)."""
    debug, argv = preflight.debugging(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog="python -m dip_r1.export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ckpt", required=True, help="Lightning checkpoint (.ckpt) of GRPOModule or SFTModule"
    )
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--merge", action="store_true", help="merge LoRA adapters into a full model")
    parser.add_argument("--model", help="base checkpoint folder (default: the one the checkpoint records)")
    parser.add_argument("--config", help="the run's config.yaml, if the checkpoint records no PolicySpec")
    parser.add_argument("--dtype", help="weight dtype of the export, e.g. bfloat16 (default: training dtype)")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into --out even when it holds files of something else"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a bad input")
    args = parser.parse_args(argv)
    with preflight.reported("python -m dip_r1.export", debug):
        out = export(
            args.ckpt,
            args.out,
            merge=args.merge,
            model=args.model,
            config=args.config,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    print(f"dip_r1: exported {args.ckpt} -> {out}")
    return out


if __name__ == "__main__":
    main()
