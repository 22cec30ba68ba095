"""The Lightning DataModule: sources in, processor-ready batches and targets out."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from dip_r1.data.images import ImageFolder
from dip_r1.data.prompts import DetectionPromptBuilder
from dip_r1.data.stream import DetectionSource, DetectionStream, source_path
from dip_r1.preflight import InputError
from dip_r1.settings import check_range

STAGES = ("train", "val", "test", "predict")


class DetectionCollate:
    """Batches stream items into processor inputs for generation plus the targets for the rewards.

    Returns ``{"inputs", "targets", "prompts", "images"}`` (and ``"sources"``, the decoded originals, when the
    prompt builder keeps them for the zoom look), or None when every item of the batch was
    skipped (its image failed to load). A class, not a closure, so DataLoader workers can pickle it.
    """

    def __init__(self, processor: Any) -> None:
        """
        Args:
            processor: A Hugging Face multimodal processor (``apply_chat_template`` and ``__call__``).
        """
        self.processor = processor
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            # Generation appends to the right end of every row, so prompts are padded on the left.
            tokenizer.padding_side = "left"

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        items = [item for item in items if "skipped" not in item]
        if not items:
            return None
        prompts = [
            self.processor.apply_chat_template(item["messages"], tokenize=False, add_generation_prompt=True)
            for item in items
        ]
        images = [item["image"] for item in items]
        inputs = self.processor(text=prompts, images=images, padding=True, return_tensors="pt")
        batch = {
            "inputs": dict(inputs),
            "targets": [item["target"] for item in items],
            "prompts": prompts,
            "images": images,
        }
        if all("source" in item for item in items):
            batch["sources"] = [item["source"] for item in items]  # the zoom look's originals
        return batch


class TrackedBatch(NamedTuple):
    """A collated batch with the bookkeeping the main process needs (the stream position, skips)."""

    batch: dict[str, Any] | None
    stage: str
    shard: int
    num_workers: int
    count: int
    skipped: list[str]
    loaded: list[str] = []
    """The source (dataset name) of each sample that loaded."""
    failed: list[str] = []
    """The source of each sample whose image failed."""
    error: InputError | None = None
    """An error raised in the worker (``strict``), raised again by the DataModule in the main process."""


class TrackingCollate:
    """Wraps a collate function; records which worker shard a batch came from and what was skipped."""

    def __init__(self, collate: Any, stage: str) -> None:
        """
        Args:
            collate: The inner collate function (e.g. a :class:`DetectionCollate`).
            stage: One of "train", "val", "test", "predict".
        """
        self.collate = collate
        self.stage = stage

    def __call__(self, items: Sequence[dict[str, Any]]) -> TrackedBatch:
        shard, workers = items[0]["shard"]
        error = next((item["error"] for item in items if "error" in item), None)
        items = [item for item in items if "error" not in item]
        skipped = [item["skipped"] for item in items if "skipped" in item]
        for item in items:  # annotation-level skips of the readers (reported by one shard), boxes dropped
            skipped += list(Counter(item.get("reader_skipped", {})).elements())
            skipped += list(Counter(item.get("dropped", {})).elements())
        loaded = [item["target"]["dataset"] for item in items if "skipped" not in item]
        failed = [item["dataset"] for item in items if "skipped" in item]
        batch = self.collate(items) if items else None
        return TrackedBatch(batch, self.stage, shard, workers, len(items), skipped, loaded, failed, error)


class DetectionDataModule(LightningDataModule):
    """Detection datasets as prompts for a VLM: streaming, sharded over ranks and workers, resumable.

    The model hands its processor over with :meth:`connect` before the loaders are built. Each batch is
    ``{"inputs": processor outputs for generation, "targets": [dict], "prompts": [str], "images":
    [PIL.Image]}``; a batch whose images all failed reaches the loop as None, with a warning, and
    Lightning skips it: no ``training_step``, no optimiser step, so ``max_steps`` still counts real steps.
    ``skipped`` counts skipped samples per reason over all workers. The training stream position is
    saved in checkpoints (``state_dict``), see :class:`~dip_r1.data.stream.DetectionStream` for the
    resume guarantee.
    """

    def __init__(
        self,
        train: list[DetectionSource] | None = None,
        val: list[DetectionSource] | None = None,
        test: list[DetectionSource] | None = None,
        predict: list[DetectionSource] | None = None,
        train_weights: list[float] | None = None,
        prompt_builder: DetectionPromptBuilder | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        shuffle_buffer: int = 64,
        seed: int = 0,
        repeat_train: bool = True,
        strict: bool = False,
        predict_images: str | None = None,
        max_failures_before_first: int = 32,
    ) -> None:
        """
        Args:
            train: Training sources (readers such as ``dip_r1.data.sources.CrowdHuman``, or any iterable of
                DetectionSample that can be iterated again).
            val: Validation sources, read once per validation run in their own order.
            test: Test sources, read once in their own order.
            predict: Sources to predict on (their annotations are kept as targets).
            train_weights: Relative sampling weight of each training source (default: equal).
            prompt_builder: Turns samples into chat messages, resized images and targets in the model's
                coordinates (default: DetectionPromptBuilder()).
            batch_size: Prompts per batch and per device.
            num_workers: DataLoader worker processes that read and decode images (0: in the main process).
            shuffle_buffer: Size of the training stream's seeded shuffle buffer (0: no shuffle).
            seed: Seed of the training stream's mixing and shuffling.
            repeat_train: Repeat the training sources endlessly (RL runs are bounded by max_steps);
                False: one pass per epoch.
            strict: Raise on a missing or corrupt image, a malformed line or an empty box, instead of skipping
                and counting it.
            predict_images: A folder or a glob of images without annotation to predict on
                (``dip-r1 predict``); added after the ``predict`` sources.
            max_failures_before_first: Stop the run when this many images of one source failed to load
                before any of its images did (a wrong image folder would otherwise skip every batch, forever,
                under ``repeat_train``), >= 1.
        """
        super().__init__()
        check_range("data.batch_size", batch_size, 1)
        check_range("data.num_workers", num_workers, 0)
        check_range("data.shuffle_buffer", shuffle_buffer, 0)
        check_range("data.max_failures_before_first", max_failures_before_first, 1)
        self.max_failures_before_first = max_failures_before_first
        self.loaded: Counter[tuple[str, str]] = Counter()
        """Samples that loaded, per ``(stage, source name)``."""
        self.failed: Counter[tuple[str, str]] = Counter()
        """Samples whose image failed, per ``(stage, source name)``."""
        self.prompt_builder = prompt_builder or DetectionPromptBuilder()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.processor: Any = None
        self.skipped: Counter[str] = Counter()
        """Samples skipped so far (all stages, all workers), per reason."""
        if predict_images is not None:
            predict = [*(predict or []), ImageFolder(predict_images)]
        self.streams: dict[str, DetectionStream] = {}
        """The stream of each stage that has sources."""
        for stage, sources in zip(STAGES, (train, val, test, predict)):
            if not sources:
                continue
            training = stage == "train"
            self.streams[stage] = DetectionStream(
                sources,
                self.prompt_builder,
                weights=train_weights if training else None,
                shuffle_buffer=shuffle_buffer if training else 0,
                seed=seed,
                repeat=repeat_train and training,
                strict=strict,
            )

    def connect(
        self,
        processor: Any,
        *,
        coordinates: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        factor: int | None = None,
        keep_source: bool = False,
    ) -> None:
        """Take the model's processor and its family's coordinate convention and pixel limits; ``keep_source``:
        batches carry the decoded original images (``"sources"``) for the zoom look.

        Pixel limits not given here nor in the prompt builder are read from the processor's image
        processor, so the processor never resizes the images again.
        """
        self.processor = processor
        self.prompt_builder.configure(
            coordinates=coordinates,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            factor=factor,
            image_processor=getattr(processor, "image_processor", None),
            keep_source=keep_source,
        )

    def _loader(self, stage: str) -> DataLoader:
        if self.processor is None:
            raise RuntimeError(
                "DetectionDataModule.connect(processor) must be called before building loaders"
            )
        if stage not in self.streams:
            raise ValueError(f"no {stage} sources were given to DetectionDataModule")
        stream = self.streams[stage]
        stream.bind_distributed()
        loader = DataLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=TrackingCollate(DetectionCollate(self.processor), stage),
        )
        if stage == "train":
            # Lightning calls set_epoch on the loader's sampler at each epoch start, and an
            # IterableDataset's loader accepts no sampler of ours: hand the stream's method over.
            loader.sampler.set_epoch = stream.set_epoch  # type: ignore[attr-defined]
        return loader

    def train_dataloader(self) -> DataLoader:
        """The training loader (endless unless ``repeat_train=False``)."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader; none (an empty list, so Lightning skips validation) without val sources."""
        return self._loader("val") if "val" in self.streams else []

    def test_dataloader(self) -> DataLoader:
        """The test loader."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The prediction loader."""
        return self._loader("predict")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count skips and advance the training stream's position for each batch the loop receives."""
        if not isinstance(batch, TrackedBatch):
            return batch
        if batch.error is not None:
            raise batch.error
        self.skipped.update(batch.skipped)
        self.loaded.update((batch.stage, name) for name in batch.loaded)
        self.failed.update((batch.stage, name) for name in batch.failed)
        for name in set(batch.failed):
            self._check_source_loads(batch.stage, name, batch.skipped)
        if batch.stage == "train":
            self.streams["train"].advance(batch.shard, batch.count, batch.num_workers)
        if batch.batch is None:
            # Lightning then skips the step with a generic warning, once per run: say which and why, each time.
            reasons = ", ".join(sorted(set(batch.skipped)))
            warnings.warn(
                f"{batch.stage} batch of {batch.count} samples skipped: no image could be loaded ({reasons})",
                stacklevel=2,
            )
        return batch.batch

    def _check_source_loads(self, stage: str, name: str, reasons: list[str]) -> None:
        """Stop when a source has failed ``max_failures_before_first`` times without one image loading."""
        failed = self.failed[(stage, name)]
        if self.loaded[(stage, name)] or failed < self.max_failures_before_first:
            return
        stream = self.streams[stage]
        path = source_path(stream.sources[stream.names.index(name)]) if name in stream.names else name
        raise InputError(
            f"{stage} source {name}",
            path,
            f"none of its first {failed} images could be loaded ({', '.join(sorted(set(reasons)))})",
            "check its image folder and the image paths of its annotations",
        )

    def usable(self, stage: str) -> int:
        """Samples of ``stage`` that loaded so far (all sources)."""
        return sum(n for (s, _), n in self.loaded.items() if s == stage)

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position and the skip counts (Lightning stores them in checkpoints)."""
        state: dict[str, Any] = {"skipped": dict(self.skipped)}
        if "train" in self.streams:
            state["train"] = self.streams["train"].state_dict()
        return state

    def teardown(self, stage: str) -> None:
        """Say once, at the end of a run, what was skipped or dropped and how often, per reason (the warnings
        along the way stop repeating after the first few)."""
        if self.skipped:
            counts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
            warnings.warn(f"data: skipped over the run (data/skipped_*): {counts}", stacklevel=2)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.skipped = Counter(state_dict.get("skipped", {}))
        if "train" in state_dict and "train" in self.streams:
            self.streams["train"].load_state_dict(state_dict["train"])
