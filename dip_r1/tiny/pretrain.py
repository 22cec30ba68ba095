"""Pretrain a tiny vision-language policy that sees: random weights -> SFT curriculum on synthetic crowds.

    python -m dip_r1.pretrain --out data/tiny-qwen3_vl-seeing

builds, from random weights, a tiny Qwen3-VL whose greedy answers depend on its image, and writes beside the
weights ``scores.json`` (held-out F1@0.5 with 1-3 people and with 6-10 people, at 160x120) and a README with
the command, the seed and the sha256 of the weights. What it takes, each measured (the benchmarks' page):

- a family whose vision tower has absolute position embeddings (Qwen3-VL), set to 2-D sines at the start,
  and a dense grounding loss on the vision tower (:mod:`dip_r1.tiny.grounding`): trained on answers alone, the
  tiny model wrote the same answer for every image;
- the vision tower trains (``freeze_vision`` is for pretrained checkpoints only), first alone on the
  grounding loss (``vision_warmup``), then with the language model;
- a short system prompt (``TINY_SYSTEM_PROMPT``; recipes that start from these bases set it too);
- a curriculum: one figure, then one to three, then one to eight, each stage its own generated set.

**The zoom stage.** ``--start <base> --look-mode zoom`` goes on from a built base and teaches it the zoom look
by teacher forcing (:mod:`dip_r1.zoom.teacher`): each target looks at the densest groups of people (none when
no two stand together), the crops are inserted after ``</look>`` exactly as the rollout inserts them, and the
people inside a crop are answered in its frame with ``"region": k``, the rest in the image frame. With
``--max-pixels`` below the images' size (``--scales 1,2``: some images twice the budget's side), the full view
loses detail that a crop gives back; but the generator draws figures in proportion to the image, so only
figures small against the budget (``--styles 1:0,0.5:2``: half of the scenes with figures half as tall, in two
tight groups) lose what a crop gives back. A ``--text-share`` of the targets keep the text look, so the base answers
in both modes and its held-out scores are given for both on the same images. The first of the committed zoom
base's three stages (``data/tiny-qwen3_vl-zoom/README.md`` has all three)::

    python -m dip_r1.pretrain --out data/tiny-qwen3_vl-zoom-stage1 --start data/tiny-qwen3_vl-seeing \
        --look-mode zoom --stages 1500:1:10:8000:160:120 --scales 1,2 --max-pixels 22000 --vision-warmup 0 \
        --lr 5e-4 --vision-lr 5e-4 --warmup 50 --held-out-size 320x240 --eval-every 750

:class:`TinyPretrain` is the same as a ``warm_start`` (:class:`~dip_r1.models.CheckpointBuilder`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dip_r1.files import built_aside
from dip_r1.tiny.curriculum import (
    HELD_OUT_SEED,
    Stage,
    batches,
    default_curriculum,
    evaluate,
    held_out_sets,
    stage_source,
    stage_sources,
)
from dip_r1.tiny.records import copy_checkpoint, sha256, write_readme


@dataclass
class TinyPretrain:
    """Build a tiny seeing policy at a path (a ``warm_start``): random weights, grounding warm-up, SFT
    curriculum on synthetic crowds. Its defaults are the committed base's (``data/tiny-qwen3_vl-seeing``)."""

    family: str = "qwen3_vl"
    """Model family (``dip_r1.tiny``); only families with a vision position table learn to see here."""
    size: str = "t"
    """Tiny size (``dip_r1.tiny.SIZES``)."""
    seed: int = 0
    """Seed of the weights, of the generated training sets and of the data order."""
    stages: list[Stage] = field(default_factory=default_curriculum)
    """The curriculum, in order."""
    scales: list[float] = field(default_factory=lambda: [1.0])
    """Sizes of each stage's images, as factors of its width and height, its images split evenly among them."""
    styles: list[tuple[float, int]] = field(default_factory=lambda: [(1.0, 0)])
    """``(figure_scale, groups)`` of each stage's scenes, its images split evenly among them (and the sizes):
    ``(0.5, 2)`` draws figures half as tall in two tight groups, small against the pixel budget, so the full view
    loses them and a crop gives them back (:class:`~dip_r1.data.synthetic.SceneStyle`)."""
    batch_size: int = 16
    """Images per optimiser step."""
    lr: float = 2e-3
    """Peak AdamW learning rate of the language model (linear warm-up, cosine decay to 2%)."""
    vision_lr: float = 2e-3
    """Peak learning rate of the vision tower and the grounding head."""
    warmup: int = 50
    """Steps of linear learning-rate warm-up."""
    vision_warmup: int = 300
    """Steps of the vision tower alone on the grounding loss before the curriculum."""
    grounding_weight: float = 1.0
    """Weight of the grounding loss beside the answer's cross-entropy during the curriculum."""
    sinusoidal: bool = True
    """Start the vision position table as 2-D sines (False: transformers' random initialisation)."""
    cache: str = "data/pretrain-sets"
    """Folder of the generated training and held-out sets."""
    eval_every: int = 0
    """Also evaluate on the held-out sets every this many steps (0: only at the end)."""
    eval_images: int = 64
    """Images in each held-out set."""
    home: str | None = "data/tiny-qwen3_vl-seeing"
    """The one folder a ``warm_start`` builds in unasked (the committed base's, relative to the working
    folder); a ``policy.path`` elsewhere that holds no model stops the run instead of starting a build."""
    force: bool = False
    """As a ``warm_start``: build at any missing ``policy.path`` (``--model.init_args.warm_start.init_args.force
    true``)."""
    start: str | None = None
    """Go on from this checkpoint instead of random weights (a stage on a built base, e.g. the zoom stage); its
    family and size are the checkpoint's."""
    look_mode: str = "text"
    """``"zoom"``: teach the zoom look by teacher forcing (:func:`dip_r1.zoom.targets.zoom_target`: looks over
    the densest groups, the crops inserted, the people inside a crop answered in its frame); the held-out
    scores are then given with the zoom look and with the text look on the same images."""
    text_share: float = 0.25
    """Zoom: the share of targets written in the text look (the same think and look, no crops after
    ``</look>``, every box in the image frame), so that the same base also answers in text mode."""
    max_pixels: int | None = None
    """The prompt builder's pixel budget for each image (None: the processor's); images larger than it are
    reduced, as real photos are, and a crop of the source holds detail the full view lost."""
    max_looks: int = 2
    """Zoom: the most crops a target opens (the rollout's ``sampling.max_looks``)."""
    zoom_max_pixels: int | None = None
    """Zoom: a crop's pixel budget (the rollout's ``sampling.zoom_max_pixels``; None: the prompt's)."""
    crop_grounding: bool = True
    """Zoom: the grounding loss also on the crops (the people whose centre each holds, in its frame)."""
    held_out_size: tuple[int, int] = (160, 120)
    """Width and height of the held-out sets' images."""

    def __post_init__(self) -> None:
        if self.look_mode not in ("text", "zoom"):
            raise ValueError(f"look_mode must be 'text' or 'zoom', got {self.look_mode!r}")
        if not 0.0 <= self.text_share <= 1.0:
            raise ValueError(f"text_share must lie in [0, 1], got {self.text_share}")
        if self.max_looks < 1:
            raise ValueError(f"max_looks must be at least 1, got {self.max_looks}")
        if self.max_pixels is not None and self.max_pixels < 1024:
            raise ValueError(f"max_pixels must be at least 1024 (a 32x32 image), got {self.max_pixels}")
        if self.zoom_max_pixels is not None and self.zoom_max_pixels < 1024:
            raise ValueError(
                f"zoom_max_pixels must be at least 1024 (a 32x32 crop), got {self.zoom_max_pixels}"
            )

    def build(self, path: str | Path) -> Path:
        """Write the checkpoint, ``scores.json`` and ``README.md`` to ``path``; return it."""
        pretrain(path, self)
        return Path(path)


_WARM_START_FIELDS = ("home", "force")
"""Fields of :class:`TinyPretrain` about where a warm start may build, not about the model: not recorded."""


def _lr_scale(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay, floored at 2% of the peak."""
    return max(min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total)), 0.02)


def pretrain(
    out: str | Path,
    config: TinyPretrain | None = None,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> dict:
    """Build the checkpoint at ``out`` (atomically) and return its record (also ``out/scores.json``, and a
    ``README.md`` naming ``command``, by default the ``python -m dip_r1.pretrain`` line of the defaults)."""
    c = config or TinyPretrain()
    out, cache = Path(out), Path(c.cache)
    with built_aside(out, replace=True) as tmp:
        return _pretrain(tmp, out, c, cache, log, command)


def _pretrain(tmp: Path, out: Path, c: TinyPretrain, cache: Path, log, command: str | None) -> dict:
    """:func:`pretrain` into the folder ``tmp``, published at ``out`` when it returns."""
    from dip_r1.grpo import masked_mean
    from dip_r1.models import PolicySpec, load_policy
    from dip_r1.scoring import completion_logprobs
    from dip_r1.sft import SFTModule
    from dip_r1.tiny.checkpoints import save_tiny
    from dip_r1.tiny.grounding import GroundingHead, grounding_loss, sinusoidal_positions, vision_tower
    from dip_r1.tiny.zoom_stage import ZoomTeacher
    from dip_r1.zoom.teacher import teacher_logprobs

    if c.start:
        copy_checkpoint(c.start, tmp)
    else:
        save_tiny(tmp, c.family, c.size, c.seed)
    torch.manual_seed(c.seed)
    model, processor = load_policy(tmp, freeze_vision=False)
    zooming = c.look_mode == "zoom"
    teach = (
        ZoomTeacher(processor, model, c.seed, c.text_share, c.max_looks, c.zoom_max_pixels)
        if zooming
        else None
    )
    model.train()
    coordinates = PolicySpec(str(tmp)).data_spec(processor)["coordinates"]
    sft = SFTModule(PolicySpec(str(tmp)), max_target_tokens=1024)  # its target_ids only
    if c.sinusoidal and not c.start and not sinusoidal_positions(model):  # a start keeps its trained table
        log(f"dip_r1.pretrain: {c.family} has no vision position table; it may not learn to see")
    head = GroundingHead(model.config.get_text_config().hidden_size)  # trained here, never saved
    vision = {id(p) for p in vision_tower(model).parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if id(p) not in vision], "lr": c.lr},
            {"params": [p for p in params if id(p) in vision] + list(head.parameters()), "lr": c.vision_lr},
        ],
        betas=(0.9, 0.98),
        weight_decay=0.0,
    )
    peaks = [g["lr"] for g in optimizer.param_groups]
    start, history = time.perf_counter(), []

    def held_out() -> dict:
        scores = {}
        for i, (name, s) in enumerate(held_out_sets(c.eval_images, *c.held_out_size).items()):
            for mode in ("zoom", "text") if zooming else ("text",):
                loader = batches(
                    processor, coordinates, [stage_source(cache, "eval", s, HELD_OUT_SEED + i)], 16, 0, False,
                    c.max_pixels, zooming,
                )  # fmt: skip
                key = f"{name}/{mode}" if zooming else name
                scores[key] = evaluate(model, processor, loader, 320 + 80 * zooming, mode, c.zoom_max_pixels)
        return scores

    def elapsed() -> float:
        return round(time.perf_counter() - start, 1)

    if c.vision_warmup:
        # The vision tower and the head alone first: the language model then starts from features that
        # already say where the figures are.
        warm = torch.optim.AdamW(
            [p for p in params if id(p) in vision] + list(head.parameters()), lr=c.vision_lr
        )
        sources = stage_sources(cache, c.stages[0], c.seed * 100, c.scales, c.styles)
        for i, batch in zip(
            range(c.vision_warmup), batches(processor, coordinates, sources, c.batch_size, c.seed, True)
        ):
            loss = grounding_loss(model, head, batch["inputs"], batch["targets"])
            warm.zero_grad(set_to_none=True)
            loss.backward()
            warm.step()
            if (i + 1) % 50 == 0:
                log(json.dumps({"vision_warmup": i + 1, "grounding": round(loss.item(), 4), "s": elapsed()}))

    step, total = 0, sum(s.steps for s in c.stages)
    for index, stage in enumerate(c.stages):
        sources = stage_sources(cache, stage, c.seed * 100 + index, c.scales, c.styles)
        stream = batches(processor, coordinates, sources, c.batch_size, c.seed, True, c.max_pixels, zooming)
        for batch in zip(range(stage.steps), stream):
            batch = batch[1]
            for group, peak in zip(optimizer.param_groups, peaks):
                group["lr"] = peak * _lr_scale(step, total, c.warmup)
            images, seen = batch["inputs"], batch["targets"]  # what the grounding loss is taken on
            if teach is not None:
                teacher, crop_targets = teach(batch)
                logp, mask = teacher_logprobs(model, teacher), teacher.supervised  # [B, K] each
                if c.crop_grounding:  # the crops too: where each person stands in a magnified view
                    images, seen = teacher.inputs, crop_targets
            else:
                ids, mask = sft.target_ids(batch["targets"])  # [B, T]
                logp = completion_logprobs(model, batch["inputs"], torch.arange(len(ids)), ids, mask)
            answer = -masked_mean(logp, mask)
            grounding = grounding_loss(model, head, images, seen) if c.grounding_weight else 0 * answer
            optimizer.zero_grad(set_to_none=True)
            (answer + c.grounding_weight * grounding).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % 25 == 0:
                log(
                    json.dumps(
                        {
                            "step": step,
                            "stage": index,
                            "loss": round(answer.item(), 4),
                            "grounding": round(grounding.item(), 4),
                            "s": elapsed(),
                        }
                    )
                )
            if c.eval_every and step % c.eval_every == 0:
                history.append({"step": step, **held_out()})
                log(json.dumps(history[-1]))

    scores = held_out()
    model.save_pretrained(tmp)
    record = {
        "scores": scores,
        "steps": step,
        "seconds": elapsed(),
        "sha256": sha256(tmp / "model.safetensors"),
        "config": {k: v for k, v in asdict(c).items() if k not in _WARM_START_FIELDS},
        "held_out": {k: asdict(s) for k, s in held_out_sets(c.eval_images, *c.held_out_size).items()},
        "history": history,
    }
    (tmp / "scores.json").write_text(json.dumps(record, indent=2) + "\n")
    write_readme(tmp, out.name, record, command or f"python -m dip_r1.pretrain --out {out}")
    log(json.dumps({"scores": scores, "seconds": record["seconds"], "sha256": record["sha256"]}))
    return record


def _stages(text: str) -> list[Stage]:
    """``steps:min:max[:n[:width:height]],...`` as stages."""
    parts = [part.split(":") for part in text.split(",")]
    try:
        if any(not 3 <= len(values) <= 6 for values in parts):
            raise ValueError
        return [Stage(*[int(v) for v in values]) for values in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a stage is steps:min:max[:n[:width:height]], got {text!r}"
        ) from None


def _styles(text: str) -> list[tuple[float, int]]:
    """``figure_scale:groups,...`` as pairs, each checked by :class:`~dip_r1.data.synthetic.SceneStyle`.

    >>> _styles("1:0,0.5:2")
    [(1.0, 0), (0.5, 2)]
    """
    from dip_r1.data.synthetic import SceneStyle

    try:
        styles = [(float(a), int(b)) for a, b in (part.split(":") for part in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a style is figure_scale:groups, got {text!r}") from None
    for scale, groups in styles:
        try:
            SceneStyle(figure_scale=scale, groups=groups)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"a style's {exc} (in {text!r})") from None
    return styles


def main(argv: list[str] | None = None) -> None:
    d = TinyPretrain()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder to write the checkpoint to")
    parser.add_argument("--family", default=d.family)
    parser.add_argument("--size", default=d.size)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--stages",
        type=_stages,
        default=None,
        help="steps:min:max[:n[:width:height]],...",
    )
    parser.add_argument(
        "--scales",
        type=lambda t: [float(v) for v in t.split(",")],
        default=d.scales,
        help="image sizes of every stage as factors of its size, e.g. 0.8,1,1.2,1.4",
    )
    parser.add_argument(
        "--styles",
        type=_styles,
        default=d.styles,
        help="figure_scale:groups of every stage's scenes, e.g. 1:0,0.5:2 (figures half as tall in two groups)",
    )
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--vision-lr", type=float, default=d.vision_lr)
    parser.add_argument("--vision-warmup", type=int, default=d.vision_warmup)
    parser.add_argument("--grounding-weight", type=float, default=d.grounding_weight)
    parser.add_argument(
        "--random-positions", action="store_true", help="keep the random vision position table"
    )
    parser.add_argument("--cache", default=d.cache)
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on 2 shared cores)"
    )
    parser.add_argument("--start", default=None, help="go on from this checkpoint instead of random weights")
    parser.add_argument("--look-mode", default=d.look_mode, choices=("text", "zoom"))
    parser.add_argument("--text-share", type=float, default=d.text_share)
    parser.add_argument("--max-pixels", type=int, default=d.max_pixels)
    parser.add_argument("--max-looks", type=int, default=d.max_looks)
    parser.add_argument("--zoom-max-pixels", type=int, default=d.zoom_max_pixels)
    parser.add_argument(
        "--no-crop-grounding", action="store_true", help="zoom: the grounding loss on the prompt images only"
    )
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument(
        "--held-out-size",
        type=lambda t: tuple(int(v) for v in t.split("x")),
        default=d.held_out_size,
        help="WIDTHxHEIGHT of the held-out images",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.start and not (Path(args.start) / "config.json").is_file():
        parser.error(f"--start {args.start} holds no checkpoint (no config.json)")
    try:
        config = _config(args)
    except ValueError as exc:
        parser.error(str(exc))
    command = "python -m dip_r1.pretrain " + " ".join(sys.argv[1:] if argv is None else argv)
    pretrain(args.out, config, command=command)


def _config(args: argparse.Namespace) -> TinyPretrain:
    return TinyPretrain(
        family=args.family,
        size=args.size,
        seed=args.seed,
        stages=args.stages or default_curriculum(),
        scales=args.scales,
        styles=args.styles,
        batch_size=args.batch_size,
        lr=args.lr,
        vision_lr=args.vision_lr,
        vision_warmup=args.vision_warmup,
        grounding_weight=args.grounding_weight,
        sinusoidal=not args.random_positions,
        cache=args.cache,
        eval_every=args.eval_every,
        start=args.start,
        look_mode=args.look_mode,
        text_share=args.text_share,
        max_pixels=args.max_pixels,
        max_looks=args.max_looks,
        zoom_max_pixels=args.zoom_max_pixels,
        crop_grounding=not args.no_crop_grounding,
        warmup=args.warmup,
        held_out_size=args.held_out_size,
    )


if __name__ == "__main__":
    main()
