"""Pretrain a tiny vision-language policy that sees: random weights -> SFT curriculum on synthetic crowds.

A tiny VLM trained naively from random weights learns the language of the answer and ignores its image
(every held-out image gets the same answer). What made this one see, measured in BENCHMARKS.md:

- a family whose vision tower has absolute position embeddings (Qwen3-VL): Qwen2-VL's tower has only
  rotary positions inside attention, so its features do not say *where* a patch is, and a few-million
  parameter model never learnt to read positions from them;
- the vision tower trains (``freeze_vision`` is for pretrained checkpoints only);
- a short system prompt (the tokens the model reads every step are mostly image and answer);
- a curriculum: one figure, then a few, then crowds, each stage its own generated set.

    python -m dip_r1.pretrain --out data/tiny-qwen3_vl-seeing --seed 0

writes the checkpoint, ``scores.json`` (held-out F1@0.5 with 1-3 and with 6 or more people) and a README
with the command, the seed and the sha256 of the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dip_r1.data.prompts import DetectionPromptBuilder

TINY_SYSTEM_PROMPT = "Answer with <think>, <look> and <answer> blocks."
"""The short system prompt of the tiny bases (the recipes that start from them set it too)."""


@dataclass
class Stage:
    """One stage of the curriculum: a synthetic set and a number of optimiser steps on it."""

    steps: int
    """Optimiser steps."""
    min_people: int
    """Fewest figures per image."""
    max_people: int
    """Most figures per image."""
    n: int = 2000
    """Images generated for the stage."""
    width: int = 160
    """Image width."""
    height: int = 120
    """Image height."""


DEFAULT_CURRICULUM = [Stage(300, 1, 1), Stage(600, 1, 3), Stage(600, 1, 8)]


def _sets_root(cache: Path, tag: str, stage: Stage, seed: int) -> Path:
    return (
        cache / f"{tag}-{stage.min_people}-{stage.max_people}-{stage.width}x{stage.height}-n{stage.n}-s{seed}"
    )


def _source(cache: Path, tag: str, stage: Stage, seed: int, name: str):
    from dip_r1.quickstart import SyntheticCrowd

    return SyntheticCrowd(
        root=str(_sets_root(cache, tag, stage, seed)),
        n=stage.n,
        seed=seed,
        width=stage.width,
        height=stage.height,
        min_people=stage.min_people,
        max_people=stage.max_people,
        name=name,
    )


def _loader(processor, coordinates: str, sources: list, batch_size: int, seed: int, train: bool):
    from dip_r1.data import DetectionDataModule

    data = DetectionDataModule(
        **({"train": sources} if train else {"val": sources}),
        prompt_builder=DetectionPromptBuilder(system_prompt=TINY_SYSTEM_PROMPT),
        batch_size=batch_size,
        num_workers=1,
        seed=seed,
        shuffle_buffer=256,
    )
    data.connect(processor, coordinates=coordinates)
    loader = data.train_dataloader() if train else data.val_dataloader()
    return (data.on_before_batch_transfer(b, 0) for b in loader)


@torch.no_grad()
def evaluate(model, processor, loader, max_new_tokens: int = 320) -> dict[str, float]:
    """Greedy answers on a held-out loader: precision, recall, F1@0.5, format-valid rate, distinct answers."""
    from dip_r1.metrics import DetectionMetrics
    from dip_r1.rewards import parse_completion
    from dip_r1.rollout import sample_completions

    model.eval()
    metric = DetectionMetrics()
    texts, valid = [], []
    eos = processor.tokenizer.eos_token_id
    pad = processor.tokenizer.pad_token_id
    for batch in loader:
        if batch is None:
            continue
        rollout = sample_completions(
            model,
            batch["inputs"],
            group_size=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            do_sample=False,
        )
        for text, target in zip(
            processor.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True),
            batch["targets"],
        ):
            parsed = parse_completion(text)
            boxes = parsed.answer if parsed.answer is not None else torch.zeros(0, 4)
            metric.update([{"boxes": boxes}], [{"boxes": target["boxes"], "ignore": target["ignore"]}])
            texts.append(text)
            valid.append(parsed.well_formed)
    out = {k: float(v) for k, v in metric.compute().items() if k in ("precision", "recall", "f1")}
    out["format_valid"] = sum(valid) / max(len(valid), 1)
    out["distinct_answers"] = len(set(texts)) / max(len(texts), 1)
    model.train()
    return out


def _param_groups(model, lr: float, vision_lr: float, weight_decay: float) -> list[dict]:
    vision, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (vision if ".visual." in f".{name}." else rest).append(p)
    return [
        {"params": rest, "lr": lr, "weight_decay": weight_decay},
        {"params": vision, "lr": vision_lr, "weight_decay": weight_decay},
    ]


def pretrain(
    out: str | Path,
    *,
    family: str = "qwen3_vl",
    size: str = "s",
    seed: int = 0,
    curriculum: list[Stage] | None = None,
    batch_size: int = 16,
    lr: float = 2e-3,
    vision_lr: float = 2e-3,
    warmup: int = 50,
    weight_decay: float = 0.0,
    cache: str | Path = "data/pretrain-sets",
    eval_images: int = 64,
    eval_every: int = 0,
    log=print,
) -> dict:
    """Build a tiny checkpoint at ``out`` from random weights and SFT it through ``curriculum``.

    Returns the held-out scores (also written to ``out/scores.json``).
    """
    from dip_r1.models import load_policy
    from dip_r1.sft import SFTModule
    from dip_r1.tiny import save_tiny

    curriculum = curriculum or DEFAULT_CURRICULUM
    out, cache = Path(out), Path(cache)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_tiny(tmp, family, size, seed)
    torch.manual_seed(seed)
    model, processor = load_policy(tmp, freeze_vision=False)
    model.train()
    from dip_r1.models import PolicySpec

    coordinates = PolicySpec(str(tmp)).data_spec(processor)["coordinates"]
    targets_of = SFTModule(PolicySpec(str(tmp)), max_target_tokens=1024)  # its target_ids, nothing else
    from dip_r1.grpo import masked_mean
    from dip_r1.rollout import completion_logprobs

    optimizer = torch.optim.AdamW(_param_groups(model, lr, vision_lr, weight_decay), betas=(0.9, 0.98))
    total = sum(s.steps for s in curriculum)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    def held_out(stage: Stage, k: int):
        return _loader(
            processor,
            coordinates,
            [
                _source(
                    cache,
                    "eval",
                    Stage(0, stage.min_people, stage.max_people, eval_images, stage.width, stage.height),
                    1000 + k,
                    "eval",
                )
            ],
            batch_size=16,
            seed=0,
            train=False,
        )

    evals = {
        "few": Stage(0, 1, 3, eval_images),
        "crowd": Stage(0, 6, 10, eval_images),
    }
    step, start, history = 0, time.perf_counter(), []
    for index, stage in enumerate(curriculum):
        loader = _loader(
            processor,
            coordinates,
            [_source(cache, "train", stage, seed * 100 + index, "train")],
            batch_size,
            seed,
            True,
        )
        for batch in loader:
            if step >= sum(s.steps for s in curriculum[: index + 1]):
                break
            if batch is None:
                continue
            scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * max(scale, 0.02)
            ids, mask = targets_of.target_ids(batch["targets"])
            logp = completion_logprobs(model, batch["inputs"], torch.arange(len(ids)), ids, mask)
            loss = -masked_mean(logp, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % 25 == 0:
                log(
                    json.dumps(
                        {
                            "step": step,
                            "stage": index,
                            "loss": round(loss.item(), 4),
                            "s": round(time.perf_counter() - start, 1),
                        }
                    )
                )
            if eval_every and step % eval_every == 0:
                scores = {
                    k: evaluate(model, processor, held_out(s, i)) for i, (k, s) in enumerate(evals.items())
                }
                history.append({"step": step, **scores})
                log(json.dumps(history[-1]))
    scores = {k: evaluate(model, processor, held_out(s, i)) for i, (k, s) in enumerate(evals.items())}
    model.save_pretrained(tmp)
    result = {
        "scores": scores,
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "history": history,
    }
    (tmp / "scores.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(json.dumps({"scores": scores, "seconds": result["seconds"]}))
    return result


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--family", default="qwen3_vl")
    parser.add_argument("--size", default="s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vision-lr", type=float, default=2e-3)
    parser.add_argument(
        "--stages", default=None, help="steps:min:max[:n[:w:h]],... (default: the built-in curriculum)"
    )
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    curriculum = None
    if args.stages:
        curriculum = [Stage(*[int(v) for v in s.split(":")]) for s in args.stages.split(",")]
    pretrain(
        args.out,
        family=args.family,
        size=args.size,
        seed=args.seed,
        curriculum=curriculum,
        batch_size=args.batch_size,
        lr=args.lr,
        vision_lr=args.vision_lr,
        eval_every=args.eval_every,
        eval_images=args.eval_images,
    )


if __name__ == "__main__":
    main()
