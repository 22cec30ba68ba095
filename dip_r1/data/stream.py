"""A streaming dataset of detection prompts: mixed, shuffled, sharded, decoded, resumable."""

from __future__ import annotations

import itertools
import math
import random
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from dip_r1.boxes import clip_boxes, valid_boxes
from dip_r1.data.images import DECODE_ERRORS, open_rgb
from dip_r1.data.prompts import DetectionPromptBuilder
from dip_r1.data.sample import DetectionSample
from dip_r1.preflight import InputError, check_annotation_file, check_folder


class DetectionSource(Protocol):
    """Anything that iterates :class:`DetectionSample` and can be iterated again from the start.

    A list of samples or any reader of ``dip_r1.data.sources``; in YAML, a ``class_path`` entry.
    """

    def __iter__(self) -> Iterator[DetectionSample]: ...


def source_name(source: Iterable[Any]) -> str:
    """The name a source's samples are tagged with: its ``name`` attribute, else its class name."""
    return str(getattr(source, "name", None) or type(source).__name__)


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (``size <= 1``: unchanged order).

    >>> list(shuffle_buffer(range(5), 1, random.Random(0)))
    [0, 1, 2, 3, 4]
    >>> sorted(shuffle_buffer(range(5), 3, random.Random(0)))
    [0, 1, 2, 3, 4]
    """
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = rng.randrange(size)
        yield buffer[k]
        buffer[k] = item
    rng.shuffle(buffer)
    yield from buffer


FILE_ATTRIBUTES = ("annotation_file", "ignore_file", "path")
"""The attributes under which the readers of ``dip_r1.data.sources`` keep the annotation files they read."""
FOLDER_ATTRIBUTES = ("image_dir", "image_root", "root")
"""The attributes under which they keep the folders they read (images, a dataset's root)."""
PATH_ATTRIBUTES = FILE_ATTRIBUTES + FOLDER_ATTRIBUTES


def source_path(source: Any) -> Path | str:
    """The first file or folder a reader reads (for messages), or its name when it has none."""
    for attribute in PATH_ATTRIBUTES:
        path = getattr(source, attribute, None)
        if isinstance(path, Path):
            return path
    return getattr(source, "pattern", None) or source_name(source)


def check_paths(source: Any) -> None:
    """Fail in one line naming the path when a reader's annotation file is missing, a folder or not UTF-8,
    or its image folder is missing (:mod:`dip_r1.preflight`).

    Readers are lazy, so without this a wrong path would surface at the first batch, after the model is
    loaded, or (a wrong image folder) as every image skipped, forever, under ``repeat``.
    """
    for attribute in PATH_ATTRIBUTES:
        path = getattr(source, attribute, None)
        if not isinstance(path, Path):
            continue
        what = f"{source_name(source)} {attribute}"
        if attribute in FILE_ATTRIBUTES:
            check_annotation_file(path, what)
        else:
            check_folder(path, what)


class DetectionStream(IterableDataset):
    """Detection prompts from one or more sources, for a DataLoader with any number of workers.

    Per epoch, every rank and worker computes the same global order of annotations: the sources
    mixed by ``weights`` (seeded), then a seeded shuffle buffer; both are pure functions of
    ``(seed, epoch)``. The item at global index ``i`` belongs to shard ``i % (world_size * workers)``,
    so over all ranks and workers every sample is seen exactly once per epoch (without ``repeat``).
    Only this worker's samples are decoded (images are opened in the worker), the others are passed
    over at the annotation level. Each yielded dict holds ``messages``, ``image``, ``target`` (see
    :class:`~dip_r1.data.prompts.Prompt`) and ``shard``; a sample whose image is missing or corrupt
    yields ``{"skipped": reason, ...}`` instead (counted in ``skipped`` and warned; ``strict`` raises),
    so that every worker's batches keep covering exactly ``batch_size`` annotations.

    Resume guarantee: the position is the number of samples the consumer took from each worker's
    shard, recorded by :meth:`advance` in the main process (the DataModule calls it for each batch
    that reaches the training loop) and saved by :meth:`state_dict`. On the next ``iter()`` each
    worker skips exactly the samples its shard delivered, and worker 0 takes the role of the worker
    whose batch was next, so with the same world size and ``num_workers`` the resumed stream yields
    the same batches, in the same order, as an uninterrupted one: no repeats, no gaps. (This relies
    on DataLoader taking whole batches round-robin from its workers and on ranks taking the same
    number of batches, as DDP does.) If the world size or worker count changed, the position is
    carried over as a global prefix, which is exact when the workers had delivered equally, else
    off by less than one batch per worker; a warning says so.
    """

    def __init__(
        self,
        sources: Sequence[DetectionSource],
        prompt_builder: DetectionPromptBuilder | None = None,
        *,
        weights: Sequence[float] | None = None,
        shuffle_buffer: int = 64,
        seed: int = 0,
        repeat: bool = False,
        strict: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """
        Args:
            sources: Iterables of samples; each must be iterable again (a list or a reader, not a generator).
            prompt_builder: Builds messages, resized image and target (default: a default builder).
            weights: Relative sampling weight of each source (default: equal); with ``repeat``, the
                share of each source in the stream.
            shuffle_buffer: Size of the seeded shuffle buffer; 0 or 1 keeps the sources' order.
            seed: Seed of the mixing and the shuffle (with the epoch).
            repeat: Restart each source when it ends, endlessly (for RL); else one pass per epoch.
            strict: Raise on a missing or corrupt image instead of skipping it, and set the ``strict`` of every
                source that has one (malformed lines, empty boxes).
            rank: This process's rank (default: torch.distributed's when initialised, else 0).
            world_size: Number of ranks (default: torch.distributed's when initialised, else 1).
        """
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("DetectionStream needs at least one source")
        for source in self.sources:
            if iter(source) is source:
                raise TypeError(
                    f"{source_name(source)} is a one-shot iterator; give a list or a reader that can be "
                    "iterated again (every worker and every epoch iterates it from the start)"
                )
            check_paths(source)
            if strict and hasattr(source, "strict"):
                source.strict = True  # strict covers the readers' lines and boxes, not only the images
        self.weights = [1.0] * len(self.sources) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.sources):
            raise InputError(
                "weights",
                self.weights,
                f"{len(self.weights)} weights for {len(self.sources)} sources",
                "give one weight per training source in data.train_weights",
            )
        if not all(math.isfinite(w) and w > 0 for w in self.weights):
            raise InputError("weights", self.weights, "not all positive", "give positive data.train_weights")
        if (rank is None) != (world_size is None) or (rank is not None and not 0 <= rank < world_size):
            raise ValueError(
                f"give both rank and world_size, with 0 <= rank < world_size ({rank}, {world_size})"
            )
        self.names = [source_name(s) for s in self.sources]
        self.prompt_builder = prompt_builder or DetectionPromptBuilder()
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.repeat = repeat
        self.strict = strict
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skipped: Counter[str] = Counter()
        """Samples skipped in this process, per reason (the DataModule counts those of all workers)."""
        self._reset_position()

    # -- position ---------------------------------------------------------------------------------

    def _reset_position(self) -> None:
        self._prefix = 0  # global items consumed before the per-shard counts start
        self._consumed: list[int] = []  # samples taken from each worker's shard of this rank
        self._batches = 0
        self._layout: tuple[int, int] | None = None  # (world_size, workers) the counts refer to

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (it seeds the order); a new epoch starts from its beginning."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset_position()

    def state_dict(self) -> dict[str, Any]:
        """The epoch and the position in it (plain Python types)."""
        return {
            "epoch": self.epoch,
            "prefix": self._prefix,
            "consumed": list(self._consumed),
            "batches": self._batches,
            "layout": None if self._layout is None else list(self._layout),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; takes effect at the next ``iter()``."""
        self.epoch = int(state["epoch"])
        self._prefix = int(state["prefix"])
        self._consumed = [int(n) for n in state["consumed"]]
        self._batches = int(state["batches"])
        self._layout = None if state["layout"] is None else (int(state["layout"][0]), int(state["layout"][1]))

    def distributed(self) -> tuple[int, int]:
        """``(rank, world_size)``: the given ones, else torch.distributed's, else ``(0, 1)``."""
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def bind_distributed(self) -> None:
        """Freeze rank and world size now, in the main process (workers may not see the process group)."""
        self.rank, self.world_size = self.distributed()

    def _position(self, layout: tuple[int, int]) -> tuple[int, list[int], int, bool]:
        """``(prefix, consumed per shard, batches, remapped)`` for iterating with ``layout``."""
        workers = layout[1]
        if self._layout is None or self._layout == layout:
            consumed = self._consumed + [0] * (workers - len(self._consumed))
            return self._prefix, consumed, self._batches, False
        old_world = self._layout[0]
        return self._prefix + old_world * sum(self._consumed), [0] * workers, 0, True

    def advance(self, shard: int, count: int, num_workers: int) -> None:
        """Record that the consumer took ``count`` samples (one batch) from worker shard ``shard``."""
        layout = (self.distributed()[1], max(1, num_workers))
        prefix, consumed, batches, _ = self._position(layout)
        consumed[shard] += count
        self._prefix, self._consumed, self._batches, self._layout = prefix, consumed, batches + 1, layout

    # -- iteration --------------------------------------------------------------------------------

    def _mixed(self, rng: random.Random) -> Iterator[tuple[int, DetectionSample]]:
        """``(source index, sample)`` pairs, sources drawn by weight until each ends (or forever)."""
        iterators = [iter(s) for s in self.sources]
        yielded = [False] * len(self.sources)  # since the source's last restart
        active = list(range(len(self.sources)))
        while active:
            if len(active) == 1:
                i = active[0]
            else:
                i = rng.choices(active, weights=[self.weights[k] for k in active])[0]
            try:
                sample = next(iterators[i])
            except StopIteration:
                if self.repeat and yielded[i]:
                    iterators[i], yielded[i] = iter(self.sources[i]), False
                else:
                    active.remove(i)
                continue
            yielded[i] = True
            yield i, sample

    def ordered(self) -> Iterator[tuple[int, DetectionSample]]:
        """This epoch's global order, the same in every rank and worker."""
        mixed = self._mixed(random.Random(f"dip_r1.mix:{self.seed}:{self.epoch}"))
        return shuffle_buffer(
            mixed, self.shuffle_buffer, random.Random(f"dip_r1.shuffle:{self.seed}:{self.epoch}")
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self.distributed()
        prefix, consumed, batches, remapped = self._position((world, workers))
        if remapped and worker == 0:
            warnings.warn(
                f"the stream position was saved with (world_size, workers) = {self._layout}, now "
                f"{(world, workers)}: continuing after a global prefix of {prefix} samples (approximate)",
                stacklevel=2,
            )
        # After a resume the DataLoader starts again at worker 0, so worker 0 plays the shard whose
        # batch came next in the round-robin: batches then arrive in the uninterrupted order.
        shard = (worker + batches) % workers
        mine = itertools.islice(self.ordered(), prefix + rank * workers + shard, None, world * workers)
        # Every worker of every rank reads every annotation line, so the readers' own skip counts (malformed
        # lines, empty boxes, unknown labels) would be counted world x workers times: one shard reports them.
        report = rank == 0 and shard == 0
        seen = [Counter(getattr(s, "skipped", None) or {}) for s in self.sources]
        try:
            for source, sample in itertools.islice(mine, consumed[shard], None):
                item = self._item(source, sample, (shard, workers))
                if report:
                    item["reader_skipped"] = self._reader_skips(seen)
                yield item
        except InputError as error:
            if info is None:
                raise
            # Raised in a DataLoader worker it would reach the user re-wrapped, with the worker's traceback:
            # it travels as an item instead, and the DataModule raises it in the main process.
            yield {"error": error, "shard": (shard, workers)}

    def _reader_skips(self, seen: list[Counter[str]]) -> Counter[str]:
        """What the readers skipped since the last call (``seen`` is updated in place)."""
        new: Counter[str] = Counter()
        for i, source in enumerate(self.sources):
            now = getattr(source, "skipped", None)
            if now:
                new += Counter(now) - seen[i]
                seen[i] = Counter(now)
        return new

    def _item(self, source: int, sample: DetectionSample, shard: tuple[int, int]) -> dict[str, Any]:
        """Decode, clip and build the prompt of one sample."""
        dataset = self.names[source]
        try:
            image = open_rgb(sample.image_path)
        except FileNotFoundError as exc:
            return self._skip(sample, dataset, shard, "missing_image", exc)
        except DECODE_ERRORS as exc:
            return self._skip(sample, dataset, shard, "corrupt_image", exc)
        width, height = image.size  # the decoded size is the truth, also when the annotation says 0
        boxes = clip_boxes(sample.boxes, width, height)
        keep = valid_boxes(boxes)
        ignore = clip_boxes(sample.ignore, width, height)
        keep_ignore = valid_boxes(ignore)
        # Boxes outside the decoded image (a reader without the image size could not clip them): counted.
        dropped = int((~keep).sum()) + int((~keep_ignore).sum())
        if dropped:
            if not self.skipped["empty_box"]:
                warnings.warn(
                    f"{dataset}: {sample.image_path}: {dropped} box(es) outside the {width}x{height} image "
                    "(skipped; counted in data/skipped_empty_box, further ones only counted)",
                    stacklevel=2,
                )
            self.skipped["empty_box"] += dropped
        sample = replace(
            sample,
            width=width,
            height=height,
            boxes=boxes[keep],
            labels=[label for label, k in zip(sample.labels, keep.tolist()) if k],
            ignore=ignore[keep_ignore],
        )
        try:
            prompt = self.prompt_builder.build(sample, image, dataset=dataset)
        except ValueError as exc:  # smart_resize refuses extreme aspect ratios
            return self._skip(sample, dataset, shard, "bad_image_size", exc)
        item = {"messages": prompt.messages, "image": prompt.image, "target": prompt.target, "shard": shard}
        if dropped:
            item["dropped"] = {"empty_box": dropped}
        if prompt.source is not None:
            item["source"] = prompt.source
        return item

    def _skip(
        self, sample: DetectionSample, dataset: str, shard: tuple[int, int], reason: str, exc: Exception
    ) -> dict[str, Any]:
        message = f"{dataset}: {sample.image_path} (image {sample.image_id}): {reason}: {exc}"
        if self.strict:
            raise InputError(
                f"{dataset} image", sample.image_path, f"{reason}: {exc}", "fix it, or set strict false to skip and count it"
            ) from exc
        self.skipped[reason] += 1
        warnings.warn(f"skipping {message}", stacklevel=3)
        return {"skipped": reason, "image_id": sample.image_id, "dataset": dataset, "shard": shard}
