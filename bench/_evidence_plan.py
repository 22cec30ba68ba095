"""The experiment of ``bench/evidence.py`` as configs: its recipe with the command line's overrides, and the
``dip-r1`` configs of each arm (``fit.yaml``) and of its evaluation (``validate.yaml``).

Imported by its bare name.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import _evidence_arms as arms
import _evidence_run as run
import yaml

from dip_r1.models import has_checkpoint

ALIASES = {
    "--lr": "--model.init_args.optimizer.init_args.lr",
    "--beta": "--model.init_args.loss.beta",
    "--group-size": "--model.init_args.group_size",
    "--max-new-tokens": "--model.init_args.sampling.max_new_tokens",
    "--temperature": "--model.init_args.sampling.temperature",
    "--batch-size": "--data.batch_size",
}
"""Short flags of earlier versions, each the recipe key it sets (the GRPO arms' settings)."""
VALIDATION = "validation"
"""The name every validation source gets: SFT's early stopping watches ``val/validation/f1``."""


def overrides(rest: list[str]) -> list[tuple[list[str], object]]:
    """``--a.b.c VALUE`` (or ``--a.b.c=VALUE``) pairs as ``(["a", "b", "c"], parsed YAML value)``; a number
    among the keys indexes a list (``--data.test.0.init_args.root``)."""
    out, i = [], 0
    while i < len(rest):
        name, eq, tail = rest[i].partition("=")
        flag = ALIASES.get(name, name) + eq + tail
        if not flag.startswith("--") or "." not in flag:
            raise ValueError(
                f"unrecognized argument {flag!r} (recipe overrides look like --model.init_args.x V)"
            )
        if "=" in flag:
            flag, value, i = *flag.split("=", 1), i + 1
        elif i + 1 < len(rest):
            value, i = rest[i + 1], i + 2
        else:
            raise ValueError(f"{flag} needs a value")
        out.append((flag[2:].split("."), _value(value)))
    return out


def _value(text: str):
    """A command-line value as YAML reads it, ``5e-5`` a number too (YAML 1.1 wants ``5.0e-5``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_recipe(args: argparse.Namespace) -> dict:
    """The recipe with the command line's overrides, ``--base`` and ``--steps`` laid over it."""
    recipe = yaml.safe_load(Path(args.config).read_text())
    pairs = list(args.overrides)
    if args.base:
        pairs.append((["model", "init_args", "policy", "path"], args.base))
    if args.steps is not None:
        pairs.append((["trainer", "max_steps"], args.steps))
    for keys, value in pairs:
        node = recipe
        try:
            for key in keys[:-1]:  # a number indexes a list: --data.test.1.init_args.root
                node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
            node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
        except (IndexError, ValueError, TypeError, AttributeError):
            raise SystemExit(f"evidence: error: --{'.'.join(keys)} names no place in {args.config}") from None
    for key in ("train", "val", "test"):
        if not recipe.get("data", {}).get(key):
            raise SystemExit(
                f"evidence: error: the recipe has no data.{key} (train, validation and test sets)"
            )
    devices = recipe.get("trainer", {}).get("devices", 1)
    if devices not in (1, "1") and not (isinstance(devices, list) and len(devices) == 1):
        # Lightning would start the whole script again in every process
        raise SystemExit(
            f"evidence: error: each arm runs on one device (trainer.devices: 1), not {devices!r}"
        )
    unnamed = [s.get("class_path") for s in recipe["data"]["test"] if not s.get("init_args", {}).get("name")]
    if unnamed:
        raise SystemExit(
            f"evidence: error: every data.test source needs init_args.name (its set), not {unnamed}"
        )
    return recipe


def shrink(recipe: dict, out: Path) -> None:
    """``--quick``: every set a few images (generated sets under ``out``), GRPO on tiny groups and answers."""
    data = recipe["data"]
    for key, n in (("train", 4), ("val", 2), ("test", 2)):
        for source in data[key]:
            init = source.get("init_args", {})
            if "n" in init:  # a generated set: fewer images, in a folder of their own
                init["n"] = n
                init["root"] = str(out / "data" / f"{Path(init['root']).name}-quick")
    data["batch_size"] = 1
    model = recipe["model"].setdefault("init_args", {})
    model["group_size"], model["micro_batch_size"] = 2, 4
    model["sampling"] = {**model.get("sampling", {}), "max_new_tokens": 12}


def ensure_base(recipe: dict, quick: bool, out: Path) -> tuple[str, str]:
    """The base checkpoint's path, built when missing; and how it came to be."""
    model = recipe["model"].setdefault("init_args", {})
    path = model.get("policy", {}).get("path")
    if path and has_checkpoint(path):
        return path, "given"
    if quick:  # never at ``path``: a random model must not stand where the real base is expected
        from dip_r1.tiny import save_tiny

        path = str(save_tiny(out / "base-random", "qwen3_vl", "xs"))
        model["policy"] = {**model.get("policy", {}), "path": path}
        return path, "random tiny (--quick, no base found)"
    if not model.get("warm_start"):
        raise SystemExit(
            f"evidence: error: no checkpoint at {path} and no model.init_args.warm_start to build it"
        )
    # The recipe's own warm start builds it, as dip-r1 would.
    run.build(
        run.write_config(out / "base.yaml", {k: recipe[k] for k in ("model", "data")}, "builds the base")
    )
    return path, f"built by {model['warm_start'].get('class_path')}"


def named(sources: list[dict], name: str | None = None) -> list[dict]:
    """Copies of source configs, each named ``name`` (or its own name)."""
    out = copy.deepcopy(sources)
    for s in out:
        if name is not None:
            s.setdefault("init_args", {})["name"] = name
    return out


def set_names(tests: list[dict]) -> tuple[list[str], list[str]]:
    """Test set names and control set names, in the recipe's order."""
    names = list(dict.fromkeys(s["init_args"]["name"] for s in tests))
    return [n for n in names if not n.startswith("control")], [n for n in names if n.startswith("control")]


class Experiment:
    """The configs of one experiment and what its arms produced."""

    def __init__(self, args: argparse.Namespace, recipe: dict, out: Path) -> None:
        self.args, self.recipe, self.out = args, recipe, out
        self.levers = arms.Levers(args.look_weight, args.look_credit, args.look_resolve, args.iou_weighted)
        sampling = recipe["model"]["init_args"].get("sampling", {})
        self.eval_sampling = {**sampling, "max_new_tokens": args.eval_max_new_tokens, "do_sample": False}
        self.sets, self.controls = set_names(recipe["data"]["test"])
        self.validation = named(recipe["data"]["val"], VALIDATION)
        crowded = [s for s in self.sets if "dense" in s] or [s for s in self.sets if s.startswith("ood")]
        self.picture_set = (crowded or self.sets)[0]
        """The set the figure's image comes from: the densest out-of-domain one."""

    def _trainer(self, logs: Path | None = None, **settings) -> dict:
        """The recipe's trainer (devices, precision, strategy) without its logger, callbacks and checkpoints."""
        drop = {
            "logger",
            "callbacks",
            "max_steps",
            "val_check_interval",
            "check_val_every_n_epoch",
            "default_root_dir",
        }
        trainer = {"devices": 1, **{k: v for k, v in self.recipe.get("trainer", {}).items() if k not in drop}}
        logger = False
        if logs is not None:
            save_dir, name = str(logs.parent), logs.name
            logger = {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": save_dir, "name": name, "version": ""},
            }
        return {**trainer, **run.QUIET, "enable_checkpointing": False, "logger": logger, **settings}

    def _data(self, seed: int, validate: bool) -> dict:
        data = {k: v for k, v in self.recipe["data"].items() if k not in ("val", "test", "predict")}
        data["seed"] = seed  # the same images in the same order for every arm of a seed
        if validate:
            data["val"] = self.validation
        return data

    def fit_config(self, arm: arms.Arm, base: str, seed: int, logs: Path) -> dict:
        """The arm's ``dip-r1 fit`` config."""
        args, model = self.args, self.recipe["model"]
        if arm.trains == "grpo":
            module = arms.grpo_model(model, arm, base, self.levers)
            every = args.grpo_val_every
            steps = self.recipe.get("trainer", {}).get("max_steps", 60)
            val = (
                {"val_check_interval": every, "check_val_every_n_epoch": None}
                if every
                else {"limit_val_batches": 0}
            )
            trainer = self._trainer(logs, max_steps=steps, log_every_n_steps=1, **val)
            return {
                "seed_everything": seed,
                "trainer": trainer,
                "model": module,
                "data": self._data(seed, bool(every)),
            }
        module = arms.sft_model(model, arm, base, args.sft_lr, self.eval_sampling)
        trainer = self._trainer(
            logs,
            max_steps=args.sft_max_steps,
            val_check_interval=args.sft_val_every,
            check_val_every_n_epoch=None,
            log_every_n_steps=1,
        )
        return {"seed_everything": seed, "trainer": trainer, "model": module, "data": self._data(seed, True)}

    def validate_config(self, arm: arms.Arm, policy: Path) -> dict:
        """How the experiment evaluated the arm: ``dip-r1 validate --config`` it with ``--data.val``."""
        data = {k: v for k, v in self.recipe["data"].items() if k in ("prompt_builder", "num_workers")}
        data["batch_size"] = self.args.eval_batch_size
        # one device and no strategy: every image's answer comes back to this process
        device = {
            k: v for k, v in self.recipe.get("trainer", {}).items() if k in ("accelerator", "precision")
        }
        trainer = {**device, "devices": 1, **run.QUIET, "enable_checkpointing": False, "logger": False}
        return {
            "seed_everything": 0,
            "trainer": trainer,
            "model": arms.eval_model(self.recipe["model"], arm, str(policy.resolve()), self.eval_sampling),
            "data": data,
        }

    def test_sources(self, arm: arms.Arm) -> list[dict]:
        """The test sets, and the controls for an untrained arm."""
        tests = self.recipe["data"]["test"]
        keep = self.sets + (self.controls if arm.trains == "none" else [])
        return [s for s in tests if s["init_args"]["name"] in keep]
