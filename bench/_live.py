"""Bytes of live tensors on the CPU, by kind: what ``torch.cuda.max_memory_allocated`` would tell on a GPU.

A CPU has no allocator statistics, and the process's resident size mixes in the interpreter, libraries and the
allocator's free lists. :class:`LiveBytes` counts instead every storage an operator creates while it is active
(a ``TorchDispatchMode``), from its creation until it is freed (a finaliser on the storage object, which PyTorch
keeps alive exactly as long as the storage): the peak of that sum, per phase, is the peak of the tensors a step
allocates. Weights, adapters, gradients and optimiser state are counted from the objects themselves.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under ``tensors`` (views and aliases counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a transformers cache holds: keys and values (their preallocated buffers when there are
    any), convolution and recurrent states of linear-attention layers."""
    out = []
    for layer in getattr(cache, "layers", []) or []:
        for value in vars(layer).values():  # linear-attention layers keep their states in dicts
            out += [
                v
                for v in (value.values() if isinstance(value, dict) else [value])
                if isinstance(v, torch.Tensor)
            ]
    return out


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode and still alive; keeps the peak per phase.

    The phase (e.g. ``"rollout"``, ``"loss"``) is ``phase_of()`` or set by the caller; :meth:`watch_cache` records the largest
    KV cache a model's forward receives during the ``"rollout"`` phase.
    """

    def __init__(self, phase_of=None) -> None:
        """
        Args:
            phase_of: called at each allocation for the phase's name (e.g. from ``GRPOModule.phase``); None:
                the ``phase`` attribute, set by the caller.
        """
        super().__init__()
        self.live = 0
        self.phase_of = phase_of
        self._phase = "loss"
        self.peaks: dict[str, int] = {}
        self.kv_cache = 0
        self._tracked: set[int] = set()

    @property
    def phase(self) -> str:
        return self.phase_of() if self.phase_of is not None else self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        self._phase = value

    def _freed(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        s = t.untyped_storage()
        key, nbytes = s._cdata, s.nbytes()
        if key in self._tracked or nbytes == 0:
            return
        self._tracked.add(key)
        self.live += nbytes
        weakref.finalize(s, self._freed, key, nbytes)
        phase = self.phase
        if self.live > self.peaks.get(phase, 0):
            self.peaks[phase] = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output on an input's storage (a view, an in-place op) allocates nothing: a view of a weight made
        # here must not count the weight
        inputs = {
            t.untyped_storage()._cdata
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if (
                isinstance(t, torch.Tensor)
                and t.device.type != "meta"
                and t.untyped_storage()._cdata not in inputs
            ):
                self._track(t)
        return out

    def watch_cache(self, model: torch.nn.Module):
        """Record the bytes of the ``past_key_values`` every forward of ``model`` receives in the rollout."""

        def hook(module, args, kwargs):
            cache = kwargs.get("past_key_values")
            if cache is not None and self.phase == "rollout":
                self.kv_cache = max(self.kv_cache, storage_bytes(_cache_tensors(cache)))

        return model.register_forward_pre_hook(hook, with_kwargs=True)


def model_bytes(model: torch.nn.Module, optimizer=None) -> dict[str, int]:
    """Bytes of the base weights (frozen parameters and buffers, 4-bit weights packed with their quantisation
    state), the adapters (trainable parameters), their gradients and the optimiser's state."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad] + list(model.buffers())
    quant = []  # bitsandbytes keeps absmax and the second-level statistics beside the packed weight
    for p in frozen:
        state = getattr(p, "quant_state", None)
        if state is not None:
            quant += [state.absmax, getattr(state, "code", None)]
            nested = getattr(state, "state2", None)
            if nested is not None:
                quant += [nested.absmax, nested.code]
    out = {
        "base_weights": storage_bytes(frozen + [q for q in quant if q is not None]),
        "adapters": storage_bytes(trainable),
        "gradients": storage_bytes(p.grad for p in trainable if p.grad is not None),
    }
    if optimizer is not None:
        states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        out["optimizer_state"] = storage_bytes(states)
    return out
