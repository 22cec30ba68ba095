"""Helpers shared by tests (importable as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lightning as L
import torch
from PIL import Image


def prompt_batch(processor, sizes=((56, 56), (84, 56))) -> dict:
    """A left-padded processor batch of one image prompt per size (prompts of different lengths)."""
    processor.tokenizer.padding_side = "left"
    texts, images = [], []
    for i, (w, h) in enumerate(sizes):
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Detect" + " people" * i}],
            }
        ]
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        images.append(Image.new("RGB", (w, h), (40 * i, 200, 90)))
    return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))


def toy_targets(n: int) -> list[dict]:
    return [{"boxes": torch.zeros(0, 4), "ignore": torch.zeros(0, 4), "image_size": (1000, 1000)}] * n


class Repeat(torch.utils.data.IterableDataset):
    """One batch, forever: a DataLoader (``batch_size=None``) for training on a fixed batch."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def quiet_trainer(**kw) -> L.Trainer:
    """A CPU Trainer that writes and prints nothing unless asked (``logger``, ``callbacks``, ``max_steps``...)."""
    kw.setdefault("logger", False)
    return L.Trainer(
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def fit_one_step(module) -> tuple[dict, L.Trainer]:
    """One real training step of ``module`` on a fixed :func:`prompt_batch`; returns that batch and the Trainer."""
    module.configure_model()
    batch = {"inputs": prompt_batch(module.processor), "targets": toy_targets(2)}
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, torch.utils.data.DataLoader(Repeat(batch), batch_size=None))
    return batch, trainer


def train_and_save(module, path) -> dict:
    """One real training step, then a seeded perturbation of every trainable weight (one step may leave LoRA's
    zero-initialised B at 0 when all advantages vanish, and a zero adapter would make the checks vacuous);
    save through the Trainer so the module's own checkpoint hook runs. Returns the input batch."""
    batch, trainer = fit_one_step(module)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    trainer.save_checkpoint(path)
    return batch


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def synthetic_crowd(root, name: str, seed: int, n: int = 4):
    """A small seeded synthetic crowd dataset (112 x 84 images, 1 to 3 people) under ``root / name``."""
    from dip_r1.data.sources import SyntheticCrowd

    return SyntheticCrowd(
        str(root / name), n=n, seed=seed, width=112, height=84, min_people=1, max_people=3, name=name
    )


def sample(
    model,
    inputs,
    *,
    group_size: int = 1,
    eos: int | list[int] = 10**6,
    pad: int = 0,
    suppress: list[int] = (),
    preallocate: bool = True,
    merge_lora: bool = True,
    compile_decode: bool = False,
    **sampling,
):
    """``sample_completions`` with its settings spelled out: ``sampling`` are :class:`SamplingConfig` fields."""
    from dip_r1.config import SamplingConfig
    from dip_r1.rollout import sample_completions
    from dip_r1.tokens import TokenIds

    tokens = TokenIds(
        eos=tuple([eos] if isinstance(eos, int) else eos), pad=pad, never_sampled=tuple(suppress)
    )
    return sample_completions(
        model,
        inputs,
        SamplingConfig(**sampling),
        tokens,
        group_size=group_size,
        preallocate=preallocate,
        merge_lora=merge_lora,
        compile_decode=compile_decode,
    )


def rollout_settings(module, monkeypatch) -> list[dict]:
    """The settings of every rollout (``sample_completions``) of one training step of ``module``: ``sampling``,
    ``tokens`` and the keyword arguments."""
    import dip_r1.module
    from dip_r1.rollout import sample_completions

    seen: list[dict] = []

    def spy(model, inputs, sampling, tokens, **kw):
        seen.append({"sampling": sampling, "tokens": tokens, **kw})
        return sample_completions(model, inputs, sampling, tokens, **kw)

    monkeypatch.setattr(dip_r1.module, "sample_completions", spy)
    fit_one_step(module)
    return seen


def assert_each_eos_stops(module, inputs: dict) -> None:
    """Each of the module's EOS ids ends a completion at once when it is the only token that may be sampled."""
    vocab = module.policy.get_output_embeddings().weight.shape[0]
    ids = module.token_ids
    for eos in ids.eos:
        rollout = sample(
            module.policy,
            inputs,
            group_size=2,
            max_new_tokens=6,
            eos=list(ids.eos),
            pad=ids.pad,
            suppress=[i for i in range(vocab) if i != eos],
        )
        assert rollout.lengths.tolist() == [1] * 4 and not rollout.truncated.any(), eos


BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """The bench module ``bench/<name>.py``, with bench/ on the path while it loads (the scripts import their
    helper modules by bare name, as when run directly)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))
