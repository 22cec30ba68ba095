"""What an evaluation shows: the metrics table, the logged keys, and the ``predictions.jsonl`` record."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dip_r1.evaluation import Prediction

METRIC_COLUMNS = (
    "precision",
    "recall",
    "f1",
    "mean_iou",
    "count_mae",
    "format_valid",
    "duplicate_ratio",
    "look_boxes",
    "ap",
    "ap50",
    "mr2",
)
"""The metrics the table shows, in order (every computed metric is logged)."""
LOWER_IS_BETTER = frozenset({"count_mae", "mr2", "duplicate_ratio"})
_HEADERS = {
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "mean_iou": "mean IoU",
    "count_mae": "count error",
    "format_valid": "format valid",
    "duplicate_ratio": "repeated boxes",
    "look_boxes": "look boxes",
    "ap": "AP",
    "ap50": "AP50",
    "mr2": "MR-2",
}


def flatten(results: Mapping[str, Mapping[str, float]], prefix: str) -> dict[str, float]:
    """``{"<prefix>/<dataset>/<metric>": value}``.

    >>> flatten({"crowd": {"f1": 0.5}}, "val")
    {'val/crowd/f1': 0.5}
    """
    return {
        f"{prefix}/{dataset}/{name}": value for dataset, row in results.items() for name, value in row.items()
    }


def metrics_table(
    results: Mapping[str, Mapping[str, float]],
    base: Mapping[str, Mapping[str, float]] | None = None,
    *,
    title: str = "evaluation",
):
    """A ``rich.table.Table`` with a row per metric and a column per dataset; with ``base``, three columns
    per dataset: the base model, the trained one and the difference (green where the trained model is
    better, red where worse). Metrics in rows keep the table narrow enough for a terminal."""
    from rich.table import Table

    table = Table(title=title, caption="at IoU 0.5; ↓ lower is better")
    table.add_column("metric", no_wrap=True)
    columns: list[tuple[str, Mapping[str, float], Mapping[str, float] | None]] = []
    for dataset, row in results.items():
        if base is not None and dataset in base:
            columns += [(f"{dataset}\nbase", base[dataset], None), (f"{dataset}\ntrained", row, None)]
            columns.append((f"{dataset}\ndifference", row, base[dataset]))
        else:
            columns.append((dataset, row, None))
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    table.add_row(
        "images", *[f"{int(row.get('images', 0))}" if ref is None else "" for _, row, ref in columns]
    )
    for name in METRIC_COLUMNS:
        label = _HEADERS[name] + (" ↓" if name in LOWER_IS_BETTER else "")
        cells = [
            _fmt(row.get(name)) if ref is None else _difference(name, row, ref) for _, row, ref in columns
        ]
        table.add_row(label, *cells)
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _difference(name: str, row: Mapping[str, float], base: Mapping[str, float]) -> str:
    a, b = row.get(name), base.get(name)
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return "-"
    d = a - b
    better = d < 0 if name in LOWER_IS_BETTER else d > 0
    colour = "green" if better else ("red" if d != 0 else "dim")
    return f"[{colour}]{d:+.3f}[/{colour}]"


def print_metrics(
    results: Mapping[str, Mapping[str, float]],
    base: Mapping[str, Mapping[str, float]] | None = None,
    *,
    title: str = "evaluation",
) -> None:
    """Print :func:`metrics_table` to the terminal."""
    from rich.console import Console

    Console().print(metrics_table(results, base, title=title))


def prediction_record(p: Prediction, image: str | None = None) -> dict[str, Any]:
    """One ``predictions.jsonl`` line: raw completion, boxes and look in original pixels, scores, rewards."""
    target = p.target
    return {
        "image_id": target.get("image_id"),
        "dataset": target.get("dataset"),
        "image_path": target.get("image_path"),
        "image": image,
        "orig_size": list(target.get("orig_size", ())),
        "completion": p.text,
        "well_formed": p.parsed.well_formed,
        "boxes": [[round(v, 2) for v in box] for box in p.boxes.tolist()],
        "scores": [round(v, 5) for v in p.scores.tolist()],
        "labels": p.parsed.labels,
        "look": [[round(v, 2) for v in box] for box in p.look.tolist()],
        "rewards": p.rewards,
    }
