"""What makes a checkpoint safe to resume from: written atomically, and carrying the random number generators.

The ``dip-r1`` CLI uses both by default. Lightning already saves the weights, optimiser, scheduler, loop
counters and the DataModule's stream position; :class:`RNGStateCallback` adds the generators that sampling
and dropout draw from, so a resumed run samples exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a half-written checkpoint under its final name.

    The checkpoint is written to ``.<name>.partial`` in the same folder, flushed to disk, then renamed over
    the target with ``os.replace`` (atomic on POSIX and Windows within one file system): a process killed
    during a save leaves the previous ``last.ckpt`` intact, plus at most a stale ``.partial`` file that the
    next save overwrites. Remote paths (``s3://`` ...) are written as ``TorchCheckpointIO`` does.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            # Streamed to the file (no in-memory copy of the whole checkpoint, unlike TorchCheckpointIO), and
            # on disk before the rename, so that a power cut cannot expose an empty file either.
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        if _is_local_file_protocol(str(path)):
            Path(path).with_name(f".{Path(path).name}.partial").unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Persist a rename (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, numpy's global and torch's CPU (and CUDA) generators, in types that
    ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class RNGStateCallback(L.Callback):
    """Saves every rank's random generator states in checkpoints and restores them on resume.

    Lightning checkpoints hold no generator state, and ``seed_everything`` at start-up would replay the
    first step's random draws (sampling, dropout) after a resume. The states are taken when the checkpoint
    is written (gathered from all ranks, since only rank 0 writes) and put back just before the first
    training batch after the resume: later than Lightning's own restore, because building the DataLoader
    iterator draws a seed from torch's generator, which the uninterrupted run did not do at that point.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = rng_state()
        rank, world = _rank_and_world()
        states = [state]
        if world > 1:  # every rank dumps the checkpoint, rank 0 writes it: collect all ranks' states
            states = [None] * world
            torch.distributed.all_gather_object(states, state)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending["ranks"], None
        rank, world = _rank_and_world()
        if len(states) != world:
            warnings.warn(
                f"the checkpoint's generator states are from {len(states)} ranks, this run has {world}: "
                "the resumed run will not sample exactly as an uninterrupted one",
                stacklevel=2,
            )
        set_rng_state(states[rank % len(states)])
