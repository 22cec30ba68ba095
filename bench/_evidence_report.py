"""What ``bench/evidence.py`` reports: training diagnostics from the logs, ``results.md`` and ``evidence.png``.

Imported by its bare name. The figure is drawn with PIL only (matplotlib is not a dependency), reusing
:func:`dip_r1.viz.draw_detections` for the detections.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _evidence_plan import VALIDATION
from _evidence_stats import finite
from PIL import Image, ImageDraw

from dip_r1.evaluation import to_original_pixels
from dip_r1.report import LOWER_IS_BETTER
from dip_r1.viz import draw_detections

REWARDS = ("format", "look", "accuracy")
TRAINING_KEYS = ("completion_length", "truncated_ratio", "kl", "clip_ratio", "step_s")
ARM_COLOURS = {
    "base": (110, 110, 110),
    "sft": (0, 110, 210),
    "dip_r1": (220, 30, 40),
    "no_look": (30, 150, 60),
    "accuracy_only": (150, 60, 190),
    "base_zoom": (60, 60, 60),
    "sft_zoom": (0, 60, 130),
    "dip_r1_zoom": (240, 120, 0),
    "no_look_zoom": (20, 100, 40),
}
"""One colour per arm, in the charts and the tiles' titles (the boxes keep ``dip_r1.viz``'s colours)."""


def read_log(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value)]}`` of a Lightning CSV log (empty when the arm did not train)."""
    if not path.is_file():
        return {}
    columns: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if value not in (None, "") and key != "step":
                    columns.setdefault(key, []).append((step, float(value)))
    return columns


def training_diagnostics(log: dict[str, list[tuple[int, float]]]) -> dict:
    """Means over the run of what says whether GRPO had a signal: per reward its mean, the fraction of groups
    whose G values were all equal (``zero_std_ratio``: such a group gives no gradient) and its first and last
    fifths; completion length, truncation, KL, clip ratio, step time; and the SFT loss's fifths."""

    def mean(key: str, part: slice = slice(None)) -> float | None:
        values = [v for _, v in log.get(key, [])][part]
        return finite(float(np.mean(values))) if values else None

    n = max((len(v) for v in log.values()), default=0)
    fifth = max(1, n // 5)
    out: dict = {"steps_logged": n}
    for r in REWARDS:
        key = f"train/reward_{r}"
        if key in log:
            out[f"reward_{r}"] = {
                "mean": mean(key),
                "first_fifth": mean(key, slice(0, fifth)),
                "last_fifth": mean(key, slice(-fifth, None)),
                "zero_std_ratio": mean(f"train/zero_std_ratio_{r}"),
            }
    # A reward whose G values were equal in every group of the run gave no gradient at all: a defect to find.
    out["never_varied"] = [
        r for r in REWARDS if f"reward_{r}" in out and out[f"reward_{r}"]["zero_std_ratio"] == 1.0
    ]
    if "train/zero_std_ratio" in log:
        out["zero_std_ratio_total"] = mean("train/zero_std_ratio")
    for key in TRAINING_KEYS:
        if f"train/{key}" in log:
            out[key] = mean(f"train/{key}")
    validation = log.get(f"val/{VALIDATION}/f1", [])  # GRPO with --grpo-val-every: where F1 stops rising
    if validation:
        out["validation_f1"] = {str(step): finite(v) for step, v in validation}  # averaged step by step
    if "train/sft_loss" in log:
        out["sft_loss"] = {
            "first_fifth": mean("train/sft_loss", slice(0, fifth)),
            "last_fifth": mean("train/sft_loss", slice(-fifth, None)),
        }
    return out


def mean_of(diagnostics: list[dict]) -> dict:
    """The seeds' :func:`training_diagnostics` averaged key by key (nested dicts alike; null where none)."""
    out: dict = {}
    for key in dict.fromkeys(k for d in diagnostics for k in d):
        values = [d[key] for d in diagnostics if d.get(key) is not None]
        if values and isinstance(values[0], dict):
            out[key] = mean_of(values)
        elif values and isinstance(values[0], list):  # names: those of every seed
            out[key] = [v for v in values[0] if all(v in other for other in values)]
        else:
            out[key] = finite(float(np.mean(values))) if values else None
    return out


def _cell(row: dict) -> str:
    if row["mean"] is None:
        return "-"
    return f"{row['mean']:.3f} ± {row['std']:.3f}"


def _table(rows: dict, sets: Sequence[str], keys: Sequence[str]) -> list[str]:
    arrow = {m: " ↓" if m in LOWER_IS_BETTER else "" for m in keys}
    lines = []
    for s in sets:
        lines += [f"### {s}", "", "| arm | " + " | ".join(m + arrow[m] for m in keys) + " |"]
        lines.append("|---|" + "---|" * len(keys))
        for arm, per_set in rows.items():
            lines.append(f"| {arm} | " + " | ".join(_cell(per_set[s][m]) for m in keys) + " |")
        lines.append("")
    return lines


def markdown(results: dict, diagnostics: dict, sets: Sequence[str], metrics: Sequence[str]) -> str:
    """The results as Markdown: per set a table (mean ± std over seeds), the comparisons with their intervals,
    each seed's F1, the sets, the answers, the training and SFT's early stopping."""
    table = {arm: v for arm, v in results.items() if arm not in ("comparisons", "splits")}
    lines = [f"`{diagnostics['command']}`", ""]
    for arm, why in diagnostics.get("skipped_arms", {}).items():
        lines.append(f"- **{arm} skipped**: {why}")
    lines += ["", *_table(table, sets, metrics)]
    lines += [
        "Differences of F1@0.5 (test images paired by seed and id, seeds pooled; paired bootstrap, 95%):",
        "",
        "| comparison | " + " | ".join(sets) + " |",
        "|---|" + "---|" * len(sets),
    ]
    for key, per_set in results["comparisons"].items():
        if "skipped" in per_set:
            lines.append(f"| {key} | " + " | ".join([per_set["skipped"]] * len(sets)) + " |")
            continue
        cells = []
        for s in sets:
            c = per_set.get(s)
            cells.append("-" if c is None else f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "Sets (model size: after the prompt builder's pixel budget):", ""]
    for name, st in diagnostics["sets"].items():
        lines.append(
            f"- {name}: {st['images']} images of {st['source_size']} px seen at {st['model_size']}, "
            f"{st['people_per_image']} people and {st['ignore_per_image']} ignore regions per image"
        )
    if diagnostics.get("controls"):
        lines += [
            "",
            "Controls (untrained arms):",
            "",
            *_table(
                diagnostics["controls"],
                list(next(iter(diagnostics["controls"].values()))),
                ("f1", "format_valid"),
            ),
        ]
    lines += [
        "",
        "F1@0.5 of each seed:",
        "",
        "| arm | " + " | ".join(sets) + " |",
        "|---|" + "---|" * len(sets),
    ]
    for arm, per_set in table.items():
        seeds = [", ".join("-" if v is None else f"{v:.3f}" for v in per_set[s]["f1"]["seeds"]) for s in sets]
        lines.append(f"| {arm} | " + " | ".join(seeds) + " |")
    lines += [
        "",
        "Greedy answers: share of answer boxes repeating an earlier one (IoU >= 0.7), look boxes per image:",
        "",
        "| arm | " + " | ".join(f"{s} repeated ↓ | {s} look boxes" for s in sets) + " |",
        "|---|" + "---|" * (2 * len(sets)),
    ]
    for arm, per_set in diagnostics["answers"].items():
        cells = [_cell(per_set[s][k]) for s in sets for k in ("duplicate_ratio", "look_boxes")]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Training (means over steps and seeds; zero-std: share of groups whose G rewards were equal):",
        "",
    ]
    header = ["arm", "train s"] + [f"{r} first→last (zero-std)" for r in REWARDS]
    header += ["length", "truncated", "KL", "SFT: best val F1 at step (stopped by)"]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    for arm, d in diagnostics["arms"].items():
        t = d["training"]
        cells = [arm, _num(d["train_seconds"]["mean"])]
        for r in REWARDS:
            x = t.get(f"reward_{r}")
            cells.append(
                "-"
                if x is None
                else f"{_num(x['first_fifth'])}→{_num(x['last_fifth'])} ({_num(x['zero_std_ratio'])})"
            )
        cells += [_num(t.get(k)) for k in ("completion_length", "truncated_ratio", "kl")]
        stops = [e for e in d.get("early_stopping", []) if e]
        cells.append(
            ", ".join(f"{_num(e['best'])} at {e['best_step']} ({e['stopped_by']})" for e in stops) or "-"
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "The base arms are not trained and decode greedily: their seeds are one evaluation, repeated. SFT stops "
        "after its patience of validations without a new best, once it has trained as long as the seed's slowest "
        "GRPO arm; its policy is the best validation checkpoint. Nothing is chosen on a test set.",
        "",
    ]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


# ----------------------------------------------------------------- the figure, PIL only
_W, _PAD = 1500, 12


def _chart(size: tuple[int, int], title: str, ylim: tuple[float, float], xmax: float, xlabel: bool = True):
    """A blank chart: ``(image, draw, to_pixel(x, y))`` with a frame, the title, the y range and (``xlabel``)
    the last x written."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 44, 20, size[0] - 8, size[1] - 18
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, 4), title, fill=(0, 0, 0))
    lo, hi = ylim
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        draw.line([left - 3, y, left, y], fill=(0, 0, 0))
        draw.text((4, y - 6), f"{lo + frac * (hi - lo):.2f}", fill=(0, 0, 0))
    if xlabel:
        draw.text((right - 40, bottom + 4), f"step {xmax:g}", fill=(0, 0, 0))

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        fy = (y - lo) / max(hi - lo, 1e-9)
        return left + x / max(xmax, 1e-9) * (right - left), bottom - min(max(fy, 0.0), 1.0) * (bottom - top)

    return image, draw, to_pixel


def _top(values: Sequence[float]) -> float:
    """The top of a y axis over ``values`` in [0, 1]: a tenth above their largest, rounded up to 0.1."""
    return min(1.0, max(0.1, math.ceil(12 * max(values, default=0.0)) / 10))


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def reward_curves(logs: dict[str, list[dict]], size: tuple[int, int]) -> list[Image.Image]:
    """One chart per reward: each GRPO arm's curve (mean over seeds, moving average over a tenth of the run)."""
    charts = []
    for r in REWARDS:
        key = f"train/reward_{r}"
        series = {}
        for arm, runs in logs.items():
            curves = [[v for _, v in run[key]] for run in runs if key in run]
            if curves:
                n = min(len(c) for c in curves)
                mean = list(np.mean([c[:n] for c in curves], axis=0))
                series[arm] = _smooth(mean, max(1, n // 10))
        xmax = max((len(s) for s in series.values()), default=1)
        top = _top([v for values in series.values() for v in values])
        image, draw, px = _chart(size, f"train/reward_{r}", (0.0, top), xmax)
        for i, (arm, smooth) in enumerate(series.items()):
            colour = _arm_colour(arm)
            if len(smooth) > 1:
                draw.line([px(x, y) for x, y in enumerate(smooth)], fill=colour, width=2)
            draw.text((50, 22 + 12 * i), arm, fill=colour)  # the legend, top left inside the frame
        charts.append(image)
    return charts


def _arm_colour(arm: str) -> tuple[int, int, int]:
    return ARM_COLOURS.get(arm, (0, 0, 0))


def _shade(colour: tuple[int, int, int], j: int, n: int) -> tuple[int, int, int]:
    """The ``j``-th of ``n`` shades of ``colour``, from itself towards white."""
    f = 0.6 * j / max(n - 1, 1)
    return tuple(round(c + (255 - c) * f) for c in colour)


def f1_bars(table: dict, sets: Sequence[str], size: tuple[int, int]) -> Image.Image:
    """F1@0.5 per arm and set: mean bars with a ±std error bar."""
    arms = list(table)
    rows = [table[arm][s]["f1"] for arm in arms for s in sets]
    image, draw, px = _chart(
        size,
        "F1@0.5 per arm, ±std over seeds; bars left to right (darker to lighter): " + ", ".join(sets),
        (0.0, _top([(r["mean"] or 0.0) + (r["std"] or 0.0) for r in rows])),
        len(arms),
        xlabel=False,
    )
    width = 0.8 / len(sets)
    for a, arm in enumerate(arms):
        for j, s in enumerate(sets):
            row = table[arm][s]["f1"]
            mean, std = row["mean"] or 0.0, row["std"] or 0.0
            x0 = a + 0.1 + j * width
            (x_left, top), (x_right, bottom) = px(x0, mean), px(x0 + width * 0.9, 0.0)
            draw.rectangle([x_left, top, x_right, bottom], fill=_shade(_arm_colour(arm), j, len(sets)))
            cx = (x_left + x_right) / 2
            (_, hi), (_, lo) = px(x0, mean + std), px(x0, max(mean - std, 0.0))
            draw.line([cx, hi, cx, lo], fill=(0, 0, 0), width=2)
            draw.text((x_left, top - 12), f"{mean:.2f}", fill=(0, 0, 0))
        draw.text((px(a + 0.1, 0)[0], size[1] - 16), arm, fill=(0, 0, 0))
    return image


def detection_tiles(image: Image.Image, predictions: dict, height: int) -> Image.Image:
    """The same crowded image once per arm with its greedy boxes (green true, red false, yellow missed), its
    look boxes and, for a zoom arm, each crop it was shown as an inset below, with the boxes read off it."""
    tiles = []
    for arm, p in predictions.items():
        original = image.convert("RGB").resize(tuple(p.target.get("orig_size") or image.size))
        gt, ignore = (
            to_original_pixels(p.target["boxes"], p.target),
            to_original_pixels(p.target.get("ignore"), p.target),
        )
        tile = draw_detections(
            original,
            p.boxes,
            None,
            look=p.look,
            gt=gt,
            ignore=ignore,
            min_size=height - 16,
            crops=p.crops,  # zoom: each crop outlined and shown below as an inset, with the boxes read off it
            source=p.source if p.source is not None else original,
            regions=p.parsed.regions,
        )
        tile = tile.resize((round(tile.width * (height - 16) / tile.height), height - 16))
        framed = Image.new("RGB", (tile.width, height), "white")
        framed.paste(tile, (0, 16))
        ImageDraw.Draw(framed).text((2, 2), arm, fill=_arm_colour(arm))
        tiles.append(framed)
    legend = (
        "boxes: green true, red false, yellow missed; dashed: blue look, grey ignore; zoom: crops k below"
    )
    row = Image.new("RGB", (sum(t.width for t in tiles) + _PAD * len(tiles), height + 14), "white")
    x = 0
    for t in tiles:
        row.paste(t, (x, 0))
        x += t.width + _PAD
    ImageDraw.Draw(row).text((2, height + 2), legend, fill=(0, 0, 0))
    return row


def crowded(evaluations: dict, picture_set: str) -> tuple[Image.Image, dict] | None:
    """The most crowded of the kept images of ``picture_set`` and each arm's prediction on it."""
    first = next((e for e in evaluations.values() if e["images"]), None)
    if first is None:
        return None
    people = {str(p.target["image_id"]): len(p.target["boxes"]) for p in first["predictions"][picture_set]}
    image_id = max(first["images"], key=lambda i: people.get(i, 0))
    predictions = {}
    for arm, e in evaluations.items():
        match = [p for p in e["predictions"].get(picture_set, []) if str(p.target["image_id"]) == image_id]
        if match:
            predictions[arm] = match[0]
    return first["images"][image_id], predictions


def figure(logs: dict, table: dict, sets: Sequence[str], evaluations: dict, picture_set: str) -> Image.Image:
    """Reward curves (top), F1 bars (middle), each arm's boxes on one crowded test image (bottom)."""
    chart = ((_W - 4 * _PAD) // 3, 240)
    rows = [reward_curves(logs, chart), [f1_bars(table, sets, (_W - 2 * _PAD, 260))]]
    picture = crowded(evaluations, picture_set)
    if picture is not None:
        tiles = detection_tiles(*picture, 220)
        if tiles.width > _W - 2 * _PAD:
            tiles = tiles.resize((_W - 2 * _PAD, round(tiles.height * (_W - 2 * _PAD) / tiles.width)))
        rows.append([tiles])
    height = sum(max(im.height for im in row) + _PAD for row in rows) + _PAD
    canvas = Image.new("RGB", (_W, height), "white")
    y = _PAD
    for row in rows:
        x = _PAD
        for im in row:
            canvas.paste(im, (x, y))
            x += im.width + _PAD
        y += max(im.height for im in row) + _PAD
    return canvas
