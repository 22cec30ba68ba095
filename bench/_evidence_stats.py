"""The statistics of ``bench/evidence.py``: summaries over seeds and paired bootstrap intervals over images.

Imported by its bare name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def finite(value: float | None, digits: int = 5) -> float | None:
    """JSON has no NaN: an undefined metric (AP without any ground truth, say) is written as null."""
    return round(float(value), digits) if value is not None and math.isfinite(value) else None


def summary(values: Sequence[float | None]) -> dict:
    """``{"mean", "std", "seeds"}``; the sample std (0 for one seed); undefined values are null and left out."""
    known = [v for v in values if v is not None and math.isfinite(v)]
    mean = float(np.mean(known)) if known else None
    std = float(np.std(known, ddof=1)) if len(known) > 1 else (0.0 if known else None)
    return {"mean": finite(mean), "std": finite(std), "seeds": [finite(v) for v in values]}


def results(per_seed: dict, sets: Sequence[str], metrics: Sequence[str]) -> dict:
    """``{arm: {set: {metric: summary}}}`` from ``per_seed[arm][seed][set][metric]`` (a missing metric: null)."""
    return {
        arm: {
            s: {m: summary([seeds[k].get(s, {}).get(m) for k in sorted(seeds)]) for m in metrics}
            for s in sets
        }
        for arm, seeds in per_seed.items()
    }


def set_stats(evaluations: dict, sets: Sequence[str]) -> dict:
    """Per set, from the first arm that was evaluated on it: images, annotated people and ignore regions per
    image, and the source and model image sizes (the pixel budget makes the latter alike)."""
    out = {}
    for s in sets:
        predictions = next((e["predictions"][s] for e in evaluations.values() if s in e["predictions"]), [])
        n = max(len(predictions), 1)
        sizes = [tuple(p.target.get("orig_size") or ()) for p in predictions]
        resized = [tuple(p.target.get("resized_size") or ()) for p in predictions]
        out[s] = {
            "images": len(predictions),
            "people_per_image": round(sum(len(p.target["boxes"]) for p in predictions) / n, 2),
            "ignore_per_image": round(sum(len(p.target.get("ignore", [])) for p in predictions) / n, 2),
            "source_size": list(max(set(sizes), key=sizes.count)) if sizes else None,
            "model_size": list(max(set(resized), key=resized.count)) if resized else None,
        }
    return out


def f1(counts: np.ndarray) -> np.ndarray:
    """Micro F1@0.5 of summed ``[tp, predictions, ground truth]`` rows (``[..., 3]`` -> ``[...]``):
    ``2 tp / (predictions + ground truth)``, which is ``2PR / (P + R)``; 0 when both are 0."""
    tp, pred, gt = counts[..., 0], counts[..., 1], counts[..., 2]
    return np.where(pred + gt > 0, 2 * tp / np.maximum(pred + gt, 1), 0.0)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """F1@0.5 of ``a`` minus that of ``b`` and its 95% percentile interval, resampling the paired images.

    ``a`` and ``b`` are ``[N, 3]`` per-image counts of two arms on the same N (seed, image) pairs.

    >>> a = np.array([[1, 1, 1]] * 4)            # every image right
    >>> b = np.array([[1, 1, 1], [0, 1, 1]] * 2)  # half of them wrong
    >>> paired_bootstrap(a, b, resamples=200)["difference"]
    0.5
    """
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise ValueError(f"need two [N, 3] arrays of the same N > 0, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(a), size=(resamples, len(a)))  # [R, N]
    diffs = f1(a[index].sum(1)) - f1(b[index].sum(1))  # [R]
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {
        "difference": finite(float(f1(a.sum(0)) - f1(b.sum(0)))),
        "low": finite(float(low)),
        "high": finite(float(high)),
        "pairs": len(a),
        "resamples": resamples,
    }


def comparisons(counts: dict, pairs: Sequence[tuple[str, str]], sets: Sequence[str]) -> dict:
    """``{"A - B": {set: paired_bootstrap}}`` for each pair whose two arms were both run.

    ``counts[arm][seed][set][image_id]`` holds ``[tp, predictions, ground truth]``; images are paired by seed
    and id, and the seeds pooled. A pair with an arm not run says so instead (``{"skipped": reason}``).
    """
    out: dict = {}
    for a, b in pairs:
        key = f"{a} - {b}"
        missing = [arm for arm in (a, b) if arm not in counts]
        if missing:
            out[key] = {"skipped": f"not run: {', '.join(missing)}"}
            continue
        out[key] = {}
        for s in sets:
            rows_a, rows_b = [], []
            for seed in sorted(set(counts[a]) & set(counts[b])):
                ca, cb = counts[a][seed].get(s, {}), counts[b][seed].get(s, {})
                for image in sorted(set(ca) & set(cb)):
                    rows_a.append(ca[image])
                    rows_b.append(cb[image])
            if rows_a:
                out[key][s] = paired_bootstrap(np.array(rows_a, float), np.array(rows_b, float))
    return out
