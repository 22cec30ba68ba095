"""Evaluation of a policy: decode, parse once, score each box with the model's own probabilities, measure.

Pure helpers (no Lightning): the ``validation_step`` / ``test_step`` / ``predict_step`` of every policy module
(:class:`~dip_r1.policy_module.PolicyModule`) and the tiny base's pretraining call them, and they are tested
on their own. :mod:`dip_r1.report` prints and records what they measure.

Box scores. A box's score is the mean log-probability, under the model that wrote it, of the tokens that
spell the box (``[x1, y1, x2, y2]`` in the answer). Without scores, AP and MR^-2 of a generative detector
collapse to a single precision-recall point; with them they are real curves. The tokens of a box are found
by character offsets: each completion token ``k`` covers the characters ``[end[k-1], end[k])`` of the decoded
text, where ``end[k] = len(decode(ids[:k+1]))`` (the prefix decoded with the same settings as the text
that was parsed, so byte-level BPE merges, multi-byte characters and skipped special tokens all agree).
The box's tokens are those whose character range overlaps the box's span from
:func:`~dip_r1.rewards.parse_completion` (``answer_spans``); a token such as ``'],'`` that also spells a
neighbouring character counts for the box it touches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from dip_r1.boxes import repeated_boxes
from dip_r1.config import SamplingConfig
from dip_r1.data.images import ImageFolder
from dip_r1.data.prompts import to_image_coords
from dip_r1.metrics import DetectionMetrics
from dip_r1.models import is_peft
from dip_r1.rewards import ParsedCompletion, parse_completion
from dip_r1.rollout import sample_completions
from dip_r1.scoring import all_logprobs
from dip_r1.tokens import TokenIds
from dip_r1.zoom import CropGeometry, resolve_regions, zoom_of


@dataclass
class Decoded:
    """One decoded completion and the log-probabilities of its tokens."""

    text: str
    """The completion, decoded without special tokens (what is parsed)."""
    ids: list[int]
    """Its token ids, up to and including EOS."""
    logprobs: Tensor
    """``Tensor[len(ids)]`` log-probability of each token under the model (temperature 1)."""
    crops: list[CropGeometry] = field(default_factory=list)
    """Zoom: the crops the completion was shown (its sampled ``ids`` leave their tokens out)."""


@dataclass
class Prediction:
    """One image's answer, parsed and scored, with boxes in original pixels."""

    parsed: ParsedCompletion
    """The completion, parsed (boxes in the model's coordinates)."""
    scores: Tensor
    """``Tensor[N]`` mean token log-probability of each answer box (higher is surer)."""
    boxes: Tensor
    """``Tensor[N, 4]`` answer boxes in pixels of the original image."""
    look: Tensor
    """``Tensor[L, 4]`` look boxes in pixels of the original image."""
    target: dict[str, Any]
    """The sample's target (model coordinates, ``orig_size``, ``dataset``, ``image_id``, ...)."""
    rewards: dict[str, float] | None = field(default=None)
    """Each reward of this answer when the ground truth is known (predict), else None."""
    crops: list[CropGeometry] = field(default_factory=list)
    """Zoom: the crops the answer was shown, in order (``"region": k`` names the ``k``-th)."""
    source: Any = field(default=None)
    """Zoom: the source image the crops were cut from (a PIL image), else None."""

    @property
    def text(self) -> str:
        return self.parsed.text


def token_char_ends(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """End character offset of each token in ``decode(ids, skip_special_tokens=True)``.

    ``end[k] = len(decode(ids[:k + 1]))``, made non-decreasing (a prefix cut inside a multi-byte character
    decodes to a replacement character that the next token then absorbs). One ``batch_decode`` call.
    """
    if not ids:
        return []
    prefixes = tokenizer.batch_decode([list(ids[: k + 1]) for k in range(len(ids))], skip_special_tokens=True)
    ends, last = [], 0
    for text in prefixes:
        last = max(last, len(text))
        ends.append(last)
    return ends


def span_scores(logprobs: Tensor, ends: Sequence[int], spans: Sequence[tuple[int, int]]) -> Tensor:
    """Mean of ``logprobs`` over the tokens overlapping each character span, ``Tensor[len(spans)]``.

    Token ``k`` covers ``[ends[k - 1], ends[k])`` (``ends[-1]`` taken as 0). A span no token covers (it cannot
    happen when spans and ends come from the same text) scores ``-inf``.

    >>> span_scores(torch.tensor([-1.0, -2.0, -3.0]), [2, 5, 6], [(1, 3), (5, 6)])
    tensor([-1.5000, -3.0000])
    """
    if not spans:
        return torch.zeros(0)
    end = torch.as_tensor(list(ends), dtype=torch.long)
    start = torch.cat([end.new_zeros(1), end[:-1]])
    span = torch.as_tensor(list(spans), dtype=torch.long).reshape(-1, 2)
    overlap = (start[None] < span[:, 1:]) & (end[None] > span[:, :1]) & (end > start)[None]  # [N, T]
    logprobs = logprobs.detach().float().cpu()[: len(end)]
    total = (overlap * logprobs[None]).sum(1)
    count = overlap.sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, -math.inf))


@torch.no_grad()
def decode_batch(
    model: nn.Module,
    processor: Any,
    batch: Mapping[str, Any],
    sampling: SamplingConfig,
    tokens: TokenIds,
    *,
    micro_batch_size: int = 8,
) -> list[Decoded]:
    """One completion per prompt of a collated batch (greedy unless ``sampling.do_sample``; zoom: shown its
    crops, from ``batch["sources"]``) and its sampled tokens' log-probabilities at temperature 1.

    The log-probabilities come from one scoring pass over the finished completions, so greedy and sampled
    decoding are scored alike.
    """
    inputs = batch["inputs"]
    zoom = zoom_of(batch, processor, sampling, tokens)
    rollout = sample_completions(model, inputs, sampling, tokens, group_size=1, zoom=zoom)
    logp = all_logprobs(model, inputs, rollout, micro_batch_size=micro_batch_size, temperature=1.0)
    texts = processor.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    crops = rollout.crops or [[] for _ in texts]
    out = []
    for text, ids, row, mask, shown in zip(texts, rollout.completion_ids, logp, rollout.mask, crops):
        out.append(Decoded(text, ids[mask].tolist(), row[mask].detach().float().cpu(), shown))
    return out


def to_original_pixels(boxes: Tensor | None, target: Mapping[str, Any]) -> Tensor:
    """Model-coordinate boxes of a target's image in pixels of the original image (``[0, 4]`` for None)."""
    if boxes is None or len(boxes) == 0:
        return torch.zeros(0, 4)
    return to_image_coords(boxes, target["orig_size"], target["resized_size"], target["coordinates"])


def make_predictions(
    tokenizer: Any, decoded: Sequence[Decoded], targets: Sequence[dict], sources: Sequence[Any] | None = None
) -> list[Prediction]:
    """Parse each completion once (boxes read off a crop mapped to the image frame), score its answer boxes
    and convert them to original pixels."""
    out = []
    for i, (d, target) in enumerate(zip(decoded, targets, strict=True)):
        parsed = resolve_regions(parse_completion(d.text), d.crops)
        n = 0 if parsed.answer is None else len(parsed.answer)
        if parsed.answer_spans is not None and len(parsed.answer_spans) == n:
            scores = span_scores(d.logprobs, token_char_ends(tokenizer, d.ids), parsed.answer_spans)
        else:  # spans could not be aligned with the boxes (brackets inside a label): one score for all
            scores = torch.full((n,), float(d.logprobs.mean()) if len(d.logprobs) else 0.0)
        out.append(
            Prediction(
                parsed=parsed,
                scores=scores,
                boxes=to_original_pixels(parsed.answer, target),
                look=to_original_pixels(parsed.look, target),
                target=target,
                crops=d.crops,
                source=sources[i] if sources is not None and d.crops else None,
            )
        )
    return out


def predict(
    model: nn.Module,
    processor: Any,
    batch: Mapping[str, Any],
    sampling: SamplingConfig,
    tokens: TokenIds,
    *,
    micro_batch_size: int = 8,
) -> list[Prediction]:
    """Decode a collated batch (``inputs``, ``targets``, and ``sources`` to zoom) and parse, score and convert
    its answers."""
    decoded = decode_batch(model, processor, batch, sampling, tokens, micro_batch_size=micro_batch_size)
    return make_predictions(processor.tokenizer, decoded, batch["targets"], batch.get("sources"))


def has_ground_truth(target: Mapping[str, Any]) -> bool:
    """Whether a target carries annotation (images from ``predict_images`` do not)."""
    return target.get("dataset") != ImageFolder.name


def attach_rewards(predictions: list[Prediction], rewards: Callable) -> list[Prediction]:
    """Score the predictions whose ground truth is known with a :class:`~dip_r1.rewards.RewardSuite` (groups
    of one: the look reward, which needs a group's disagreement, is then 0) and store each reward."""
    known = [p for p in predictions if has_ground_truth(p.target)]
    if known:
        scores = rewards([p.parsed for p in known], [p.target for p in known], 1)
        for i, p in enumerate(known):
            p.rewards = {name: round(float(v[i]), 5) for name, v in scores.items()}
    return predictions


@contextmanager
def base_model(policy: nn.Module, full_base: Callable[[], nn.Module]) -> Iterator[nn.Module]:
    """The model the policy was trained from: the policy itself with its LoRA adapters disabled, or, for full
    fine-tuning, ``full_base()``."""
    if is_peft(policy):
        with policy.disable_adapter():
            yield policy
    else:
        yield full_base()


class DetectionEvaluator:
    """:class:`~dip_r1.metrics.DetectionMetrics`, the format-valid rate, the share of repeated answer boxes
    (:func:`repeated_boxes`) and the look boxes per image, per dataset (``target["dataset"]``).

    Boxes are compared in original pixels. Metrics sync over DDP ranks when computed; every rank must call
    :meth:`compute`, and the dataset names are gathered first so that a rank that saw no image of a dataset
    still takes part in its sync.
    """

    def __init__(self, **metric_kwargs: Any) -> None:
        """
        Args:
            metric_kwargs: Passed to each dataset's ``DetectionMetrics`` (``iou_thresholds``, ...).
        """
        self.metric_kwargs = metric_kwargs
        self.metrics: dict[str, DetectionMetrics] = {}
        self.format_valid: dict[str, MeanMetric] = {}
        self.duplicate_ratio: dict[str, MeanMetric] = {}
        self.look_boxes: dict[str, MeanMetric] = {}

    def _add(self, dataset: str) -> None:
        if dataset not in self.metrics:
            self.metrics[dataset] = DetectionMetrics(**self.metric_kwargs)
            self.format_valid[dataset] = MeanMetric()
            self.duplicate_ratio[dataset] = MeanMetric()
            self.look_boxes[dataset] = MeanMetric()

    def update(self, predictions: Sequence[Prediction]) -> None:
        """Add one batch of predictions."""
        for p in predictions:
            dataset = str(p.target.get("dataset") or "data")
            self._add(dataset)
            gt = {
                "boxes": to_original_pixels(p.target["boxes"], p.target),
                "ignore": to_original_pixels(p.target.get("ignore"), p.target),
            }
            self.metrics[dataset].update([{"boxes": p.boxes, "scores": p.scores}], [gt])
            self.format_valid[dataset].update(float(p.parsed.well_formed))
            answer, look = p.parsed.answer, p.parsed.look
            # weighted by the boxes: the share of all answer boxes, whatever the images they are in
            n = 0 if answer is None else len(answer)
            self.duplicate_ratio[dataset].update(repeated_boxes(answer) / max(n, 1), weight=n)
            self.look_boxes[dataset].update(0.0 if look is None else float(len(look)))

    def compute(self) -> dict[str, dict[str, float]]:
        """``{dataset: {metric: value}}`` over everything since the last reset, plus ``images``."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            names: list[list[str]] = [[] for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(names, sorted(self.metrics))
            for name in sorted({n for part in names for n in part}):
                self._add(name)
        out = {}
        for dataset in sorted(self.metrics):
            values = {k: float(v) for k, v in self.metrics[dataset].compute().items()}
            values["format_valid"] = float(self.format_valid[dataset].compute())
            repeated = float(self.duplicate_ratio[dataset].compute())  # nan when no answer held a box
            values["duplicate_ratio"] = repeated if math.isfinite(repeated) else 0.0
            values["look_boxes"] = float(self.look_boxes[dataset].compute())
            values["images"] = float(self.metrics[dataset].num_images)
            out[dataset] = values
        return out

    def reset(self) -> None:
        """Forget every dataset."""
        self.metrics.clear()
        self.format_valid.clear()
        self.duplicate_ratio.clear()
        self.look_boxes.clear()
