"""Dense grounding supervision for the vision tower of a VLM trained from random weights (pretraining only).

A tiny VLM trained on answers alone learns the language of the answer and ignores its image: the language
model cannot read boxes from the image tokens before the vision tower says where things are, and the vision
tower gets no useful gradient before the language model reads it. Two things break that deadlock in
:mod:`dip_r1.tiny.pretrain`, both measured (the benchmarks' page):

- :func:`sinusoidal_positions`: the vision tower's learned absolute position table (Qwen3-VL's
  ``pos_embed``) starts as 2-D sines and cosines, so a patch's row and column are readable from step one;
- :class:`GroundingHead` and :func:`grounding_loss`: a small head on every merged image token, trained to
  predict whether a figure's centre falls in that token's cell and, if so, the figure's box (CenterNet's
  assignment). It is discarded after pretraining; the checkpoint is a plain transformers model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The module named ``visual`` (every Qwen-VL family), if any."""
    return next((m for n, m in _base(model).named_modules() if n.rsplit(".", 1)[-1] == "visual"), None)


def sinusoidal_positions(model: nn.Module, scale: float = 1.0) -> bool:
    """Fill the vision tower's ``g x g`` position table with low-frequency 2-D sines and cosines.

    The first quarter of the channels are ``sin(f_k y)``, then ``cos(f_k y)``, ``sin(f_k x)``, ``cos(f_k x)``
    with ``x, y`` in ``[0, 1]`` and ``f_k = pi / 2 * k ** 0.75``; channels left over are 0. Returns whether
    the tower has such a table (Qwen2-VL and Qwen2.5-VL have none: only rotary positions in attention).

    >>> table = nn.Embedding(4, 8)
    >>> tower = nn.Module(); tower.pos_embed = table
    >>> model = nn.Module(); model.visual = tower
    >>> sinusoidal_positions(model), table.weight[0, :2].tolist(), table.weight[0, 2:4].tolist()
    (True, [0.0, 0.0], [1.0, 1.0])
    """
    table = getattr(vision_tower(model), "pos_embed", None)
    if not isinstance(table, nn.Embedding):
        return False
    g, dim = math.isqrt(table.num_embeddings), table.embedding_dim
    freqs = math.pi / 2 * torch.arange(1, dim // 4 + 1, dtype=torch.float32) ** 0.75  # [dim/4]
    coord = torch.linspace(0, 1, g)
    y, x = torch.meshgrid(coord, coord, indexing="ij")  # [g, g] each
    parts = [f(v.reshape(-1, 1) * freqs) for v in (y, x) for f in (torch.sin, torch.cos)]  # 4 x [g*g, dim/4]
    emb = torch.cat(parts, dim=1)
    emb = torch.cat([emb, torch.zeros(g * g, dim - emb.shape[1])], dim=1)  # [g*g, dim]
    with torch.no_grad():
        table.weight.copy_(emb * scale)
    return True


def cell_targets(target: dict, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(objectness [h*w], box [h*w, 4])`` for one image whose merged tokens form ``grid = (h, w)``.

    A cell (raster order, as the merged image tokens) is positive when the centre of a target box falls in
    it; a larger box wins a shared cell. Its box target is the box divided by the coordinate space.

    >>> t = {"boxes": torch.tensor([[0.0, 0, 400, 400], [600, 600, 1000, 1000]]), "image_size": (1000, 1000)}
    >>> positive, box = cell_targets(t, (2, 2))
    >>> positive.tolist(), box[3].tolist()
    ([1.0, 0.0, 0.0, 1.0], [0.6000000238418579, 0.6000000238418579, 1.0, 1.0])
    """
    h, w = grid
    space_w, space_h = target["image_size"]
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)  # [N, 4]
    scale = torch.tensor([space_w, space_h, space_w, space_h], dtype=torch.float32)
    positive, box = torch.zeros(h * w), torch.zeros(h * w, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [N]
    for i in area.argsort().tolist():  # smallest first: a larger box in the same cell overwrites it
        cx = (boxes[i, 0] + boxes[i, 2]) / 2 / space_w
        cy = (boxes[i, 1] + boxes[i, 3]) / 2 / space_h
        cell = min(int(cy * h), h - 1) * w + min(int(cx * w), w - 1)
        positive[cell], box[cell] = 1.0, boxes[i] / scale
    return positive, box


class GroundingHead(nn.Sequential):
    """An MLP from a merged image token (the language model's width) to 1 objectness logit and 4 box logits."""

    def __init__(self, hidden: int) -> None:
        super().__init__(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 5))


def grounding_loss(model: nn.Module, head: nn.Module, inputs: dict, targets: list[dict]) -> Tensor:
    """Objectness BCE on every merged image token + 5 x smooth-L1 box loss on the positive ones, per image,
    averaged over the batch. Runs the vision tower (with gradients) on ``inputs["pixel_values"]``."""
    base = _base(model)
    features = base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    merge = getattr(vision_tower(model), "spatial_merge_size", 2)
    if len(targets) != len(inputs["image_grid_thw"]):
        raise ValueError(f"{len(targets)} grounding targets for {len(inputs['image_grid_thw'])} images")
    losses = []
    for feats, thw, target in zip(features.pooler_output, inputs["image_grid_thw"].tolist(), targets):
        positive, box = cell_targets(target, (thw[1] // merge, thw[2] // merge))
        out = head(feats)  # [h*w, 5]
        loss = nn.functional.binary_cross_entropy_with_logits(out[:, 0], positive)
        keep = positive.bool()
        if keep.any():
            loss = loss + 5 * nn.functional.smooth_l1_loss(out[keep, 1:].sigmoid(), box[keep], beta=0.05)
        losses.append(loss)
    return torch.stack(losses).mean()
