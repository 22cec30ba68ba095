"""The stream: sharding over ranks and workers, mixing, shuffling, resume, bad images."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from dip_r1.data import DetectionSample, DetectionStream


def _samples(
    tmp_path: Path, n: int, prefix: str = "s", size: tuple[int, int] = (60, 40)
) -> list[DetectionSample]:
    """``n`` samples sharing one small image; width and height left 0 as some annotations do."""
    image = tmp_path / f"{prefix}.png"
    Image.new("RGB", size, (200, 30, 30)).save(image)
    return [
        DetectionSample(f"{prefix}{i}", image, 0, 0, boxes=[[10.0, 5.0, 30.0, 35.0]], labels=["person"])
        for i in range(n)
    ]


def _ids(items: list[dict]) -> tuple[tuple[int, int], list[str]]:
    """Collate: the worker shard and the image ids of a batch."""
    return items[0]["shard"], [item["target"]["image_id"] for item in items]


def _loader(stream: DetectionStream, workers: int, batch_size: int = 3) -> DataLoader:
    return DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=_ids)


def test_two_ranks_two_workers_see_every_sample_once(tmp_path):
    samples = _samples(tmp_path, 23)
    seen = []
    for rank in range(2):
        stream = DetectionStream([samples], shuffle_buffer=8, seed=3, rank=rank, world_size=2)
        seen += [i for _, ids in _loader(stream, workers=2) for i in ids]
    assert len(seen) == 23
    assert sorted(seen) == sorted(s.image_id for s in samples)


def _take(stream: DetectionStream, workers: int, n: int) -> list[list[str]]:
    """The first ``n`` batches, recording each delivered batch as the DataModule does."""
    batches = []
    for (shard, num_workers), ids in itertools.islice(_loader(stream, workers), n):
        stream.advance(shard, len(ids), num_workers)
        batches.append(ids)
    return batches


@pytest.mark.parametrize("workers", [0, 2])
def test_finite_epoch_resumed_has_no_repeat_nor_gap(tmp_path, workers):
    samples = _samples(tmp_path, 20)
    first = DetectionStream([samples], shuffle_buffer=5, seed=1)
    reference = [ids for _, ids in _loader(first, workers)]
    # 20 samples, batches of 3: 2 workers deliver 4 + 3 batches (10 samples each, last ones partial)
    assert sum(len(b) for b in reference) == 20
    first = DetectionStream([samples], shuffle_buffer=5, seed=1)
    before = _take(first, workers, 3)
    resumed = DetectionStream([samples], shuffle_buffer=5, seed=1)
    resumed.load_state_dict(first.state_dict())
    after = [ids for _, ids in _loader(resumed, workers)]
    assert before + after == reference


def test_every_rank_resumes_from_rank_zero_state(tmp_path):
    # Lightning saves rank 0's DataModule state and every rank loads it: under DDP ranks take batches
    # in lockstep, so the per-worker counts are the same on every rank.
    samples = _samples(tmp_path, 17)

    def stream(rank: int) -> DetectionStream:
        return DetectionStream([samples], shuffle_buffer=6, seed=4, repeat=True, rank=rank, world_size=2)

    rank0 = stream(0)
    _take(rank0, workers=2, n=3)
    for rank in range(2):
        reference = _take(stream(rank), workers=2, n=7)
        resumed = stream(rank)
        resumed.load_state_dict(rank0.state_dict())
        assert reference[3:] == _take(resumed, workers=2, n=4)


def test_layout_change_continues_after_the_consumed_prefix(tmp_path):
    samples = _samples(tmp_path, 30)
    stream = DetectionStream([samples], shuffle_buffer=4, seed=2)
    order = [s.image_id for _, s in stream.ordered()]
    _take(stream, workers=2, n=4)  # 2 batches of 3 from each of 2 workers: global items 0..11
    assert stream.state_dict()["consumed"] == [6, 6]
    resumed = DetectionStream([samples], shuffle_buffer=4, seed=2)
    resumed.load_state_dict(stream.state_dict())
    with pytest.warns(UserWarning, match="global prefix of 12"):
        rest = [item["target"]["image_id"] for item in resumed]  # now in the main process
    assert rest == order[12:]


def test_mixing_follows_the_weights(tmp_path):
    a, b = _samples(tmp_path, 7, "a"), _samples(tmp_path, 50, "b")
    stream = DetectionStream([a, b], weights=[3, 1], repeat=True, seed=0)
    drawn = Counter(s.image_id[0] for _, s in itertools.islice(stream.ordered(), 2000))
    # with repetition the shares follow the weights, not the sizes: 3 / (3 + 1) = 0.75
    assert 0.72 < drawn["a"] / 2000 < 0.78
    once = [s.image_id for _, s in DetectionStream([a, b], weights=[3, 1]).ordered()]
    assert sorted(once) == sorted(s.image_id for s in a + b)


def test_shuffle_is_seeded_and_changes_with_the_epoch(tmp_path):
    samples = _samples(tmp_path, 40)

    def order(seed: int, epoch: int, buffer: int = 16) -> list[str]:
        stream = DetectionStream([samples], shuffle_buffer=buffer, seed=seed)
        stream.set_epoch(epoch)
        return [s.image_id for _, s in stream.ordered()]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == sorted(order(0, 0, buffer=0))
    assert order(0, 0, buffer=0) == [f"s{i}" for i in range(40)]


def test_set_epoch_restarts_the_position(tmp_path):
    stream = DetectionStream([_samples(tmp_path, 10)], seed=0)
    stream.advance(0, 3, 0)
    assert stream.state_dict()["consumed"] == [3]
    stream.set_epoch(0)
    assert stream.state_dict()["consumed"] == [3]
    stream.set_epoch(1)
    assert stream.state_dict() == {"epoch": 1, "prefix": 0, "consumed": [], "batches": 0, "layout": None}


def test_decoding_fills_size_and_clips_boxes(tmp_path):
    image = tmp_path / "wide.png"
    Image.new("RGB", (100, 50)).save(image)
    sample = DetectionSample(
        "x", image, 0, 0, boxes=[[-10.0, 10.0, 50.0, 80.0], [120.0, 0.0, 150.0, 10.0]], labels=["person"] * 2
    )
    (item,) = DetectionStream([[sample]], shuffle_buffer=0)
    target = item["target"]
    assert target["orig_size"] == (100, 50)
    # clipped to [0, 100] x [0, 50]: the second box is outside the image and dropped; then scaled from
    # 100 x 50 to 112 x 56 (multiples of 28 with at least 3136 pixels): x * 1.12, y * 1.12
    assert target["boxes"].tolist() == [[0.0, pytest.approx(11.2), 56.0, 56.0]]
    assert target["labels"] == ["person"]


def test_bad_images_are_skipped_and_counted(tmp_path):
    good = _samples(tmp_path, 2)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bad = [DetectionSample("corrupt", corrupt, 0, 0), DetectionSample("missing", tmp_path / "nope.jpg", 0, 0)]
    stream = DetectionStream([good + bad], shuffle_buffer=0)
    with pytest.warns(UserWarning, match="nope.jpg"):
        items = list(stream)
    assert [item.get("skipped") for item in items] == [None, None, "corrupt_image", "missing_image"]
    assert stream.skipped == Counter({"corrupt_image": 1, "missing_image": 1})
    with pytest.raises(ValueError, match="corrupt.jpg"):
        list(DetectionStream([bad], shuffle_buffer=0, strict=True))


def test_bad_arguments():
    with pytest.raises(TypeError, match="one-shot"):
        DetectionStream([iter([])])
    with pytest.raises(ValueError, match="weights"):
        DetectionStream([[], []], weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="rank"):
        DetectionStream([[]], rank=2, world_size=2)
