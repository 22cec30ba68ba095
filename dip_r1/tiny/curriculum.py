"""The tiny base's curriculum: synthetic sets generated per stage, held-out sets, and their batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dip_r1.data.prompts import DetectionPromptBuilder

TINY_SYSTEM_PROMPT = "Answer with <think>, <look> and <answer> blocks."
"""The short system prompt of the tiny bases (the recipes that start from them set it too)."""


@dataclass
class Stage:
    """One stage of the curriculum: a generated synthetic set and a number of optimiser steps on it."""

    steps: int
    """Optimiser steps (0 for a held-out set)."""
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
    figure_scale: float = 1.0
    """Figure heights times this (< 1: figures small against the image, so the full view loses them and a crop
    gives them back; :class:`~dip_r1.data.synthetic.SceneStyle`)."""
    groups: int = 0
    """Figures stand in this many tight groups (0: anywhere)."""

    @property
    def styled(self) -> bool:
        """Whether the stage's scenes differ from the generator's default style."""
        return self.figure_scale != 1.0 or self.groups != 0


def default_curriculum() -> list[Stage]:
    """One figure, then one to three, then one to eight: 7,000 steps at 160x120."""
    return [Stage(700, 1, 1, 3500), Stage(3800, 1, 3, 9000), Stage(2500, 1, 8, 7000)]


HELD_OUT_SEED = 1000
"""The held-out sets' first seed: set ``i`` of :func:`held_out_sets` is drawn with ``HELD_OUT_SEED + i``."""


def held_out_sets(
    n: int = 64, width: int = 160, height: int = 120, figure_scale: float = 1.0, groups: int = 0
) -> dict[str, Stage]:
    """The held-out sets the scores are reported on (seeds 1000 and 1001, never trained on)."""
    style = (figure_scale, groups)
    return {
        "few": Stage(0, 1, 3, n, width, height, *style),
        "crowd": Stage(0, 6, 10, n, width, height, *style),
    }


def stage_sources(
    cache: Path, stage: Stage, seed: int, scales: list[float], styles: list[tuple[float, int]] | None = None
) -> list:
    """The stage's training images split evenly among ``scales`` of its size and ``styles``
    (``(figure_scale, groups)``; default: the stage's own), the k-th set with seed ``seed + 7919 k``: one scale and
    style give the set of ``seed``, and no set is a held-out set's."""
    styles = styles or [(stage.figure_scale, stage.groups)]
    sets = [(scale, style) for style in styles for scale in scales]
    return [
        stage_source(
            cache,
            "train",
            Stage(
                stage.steps,
                stage.min_people,
                stage.max_people,
                stage.n // len(sets),
                round(stage.width * scale),
                round(stage.height * scale),
                *style,
            ),
            seed + 7919 * k,
        )
        for k, (scale, style) in enumerate(sets)
    ]


def stage_source(cache: Path, tag: str, stage: Stage, seed: int):
    from dip_r1.data.sources.synthetic import SyntheticCrowd
    from dip_r1.data.synthetic import SceneStyle

    # A styled stage gets its own folder; the default style keeps the names of the sets already cached.
    style = f"-f{stage.figure_scale:g}-g{stage.groups}" if stage.styled else ""
    root = (
        cache
        / f"{tag}-{stage.min_people}-{stage.max_people}-{stage.width}x{stage.height}{style}-n{stage.n}-s{seed}"
    )
    return SyntheticCrowd(
        root=str(root),
        n=stage.n,
        seed=seed,
        width=stage.width,
        height=stage.height,
        min_people=stage.min_people,
        max_people=stage.max_people,
        name=tag,
        style=SceneStyle(figure_scale=stage.figure_scale, groups=stage.groups) if stage.styled else None,
    )


def batches(
    processor,
    coordinates: str,
    sources: list,
    batch_size: int,
    seed: int,
    train: bool,
    max_pixels: int | None = None,
    keep_source: bool = False,
) -> Iterator[dict]:
    """Batches of sources (mixed evenly when training) through the DetectionDataModule (images decoded in a
    worker), tiny prompt; ``max_pixels`` caps each image's size in the prompt, ``keep_source`` keeps the
    decoded image beside it (to zoom)."""
    from dip_r1.data import DetectionDataModule

    data = DetectionDataModule(
        **({"train": sources} if train else {"val": sources}),
        prompt_builder=DetectionPromptBuilder(system_prompt=TINY_SYSTEM_PROMPT, max_pixels=max_pixels),
        batch_size=batch_size,
        num_workers=1,
        seed=seed,
        shuffle_buffer=256,
    )
    data.connect(processor, coordinates=coordinates, keep_source=keep_source)
    loader = data.train_dataloader() if train else data.val_dataloader()
    return (b for b in (data.on_before_batch_transfer(b, 0) for b in loader) if b is not None)


@torch.no_grad()
def evaluate(
    model,
    processor,
    loader,
    max_new_tokens: int = 320,
    look_mode: str = "text",
    zoom_max_pixels: int | None = None,
) -> dict[str, float]:
    """Greedy answers, decoded and measured as ``dip-r1 validate`` does (:func:`dip_r1.evaluation.predict`), with
    the look of ``look_mode`` (``"zoom"`` needs batches that keep their sources):
    precision, recall, F1 at IoU 0.5, format-valid rate, and the fraction of distinct answers (1.0: every image
    got its own answer; a policy that ignores its image scores about 0)."""
    from dip_r1.config import SamplingConfig
    from dip_r1.evaluation import DetectionEvaluator, predict
    from dip_r1.tokens import TokenIds

    was_training = model.training
    model.eval()
    evaluator, texts = DetectionEvaluator(), []
    sampling, tokens = (
        SamplingConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            look_mode=look_mode,
            zoom_max_pixels=zoom_max_pixels,
        ),
        TokenIds.of(model, processor),
    )
    for batch in loader:
        predictions = predict(model, processor, batch, sampling, tokens)
        for p in predictions:
            p.target = {**p.target, "dataset": "held_out"}  # one row, whatever the loader's sources are named
        evaluator.update(predictions)
        texts += [p.text for p in predictions]
    row = evaluator.compute().get("held_out", {})
    out = {k: row.get(k, 0.0) for k in ("precision", "recall", "f1", "format_valid")}
    out["distinct_answers"] = len(set(texts)) / max(len(texts), 1)
    model.train(was_training)
    return out
